"""OptimConfig validation, AdamW / SGD, parameter groups (quantizer parameters found by identity)."""
import pytest
import torch
from torch import nn

from qat.builders import as_dict
from qat.models import create_model
from qat.optim import OptimConfig, build_optimizer, param_groups, quant_parameters
from qat.quant import LSQQuantizer, QuantConfig, quantize_
from tests.conftest import compose_config


def names(model: nn.Module, groups: dict) -> dict[str, list[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {group: [name_of[id(p)] for p in g["params"]] for group, g in groups.items()}


@pytest.mark.parametrize("key,value,valid", [("name", "adam", "['adamw', 'sgd']"),
                                             ("clip_mode", "max", "['norm', 'agc', 'value']"),
                                             ("lr_scale_rule", "sqrt", "['none', 'linear']")])
def test_bad_choice_is_a_one_line_error(key, value, valid):
    message = f"optim.{key}='{value}' is not valid: use one of {valid}"
    with pytest.raises(ValueError) as err:
        OptimConfig(**{key: value})
    assert str(err.value) == message


def test_quantizer_params_are_found_by_identity_not_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.clip = LSQQuantizer(2, learnable_offset=True)  # a quantizer under a name no pattern would guess
    model.register_parameter("step", nn.Parameter(torch.ones(2, 2)))  # a plain weight named like a step
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1, quant_lr=0.5)}
    assert (groups["quant"]["lr"], groups["quant"]["weight_decay"]) == (0.5, 0.0)
    assert names(model, groups) == {"decay": ["step", "0.weight"], "no_decay": ["0.bias", "1.weight", "1.bias"],
                                    "quant": ["clip.step", "clip.offset"]}


def test_quantized_vit_groups_cover_every_trainable_parameter_once():
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(weight={"bits": 2}, act={"bits": 2}, attn={"bits": 2},
                                                             learnable_bias=True))
    groups = {g["name"]: g["params"] for g in param_groups(model, 0.05, None)}
    assert "lr" not in groups and len(groups["quant"]) == len(quant_parameters(model)) == 8 * 3 + 2 * 4
    ids = [id(p) for params in groups.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_class_and_position_embeddings_are_decayed_by_default(decay_embeddings):  # reference §2.6
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(weight={"bits": 2}, act={"bits": 2}))
    groups = names(model, {g["name"]: g for g in param_groups(model, 0.05, None, decay_embeddings)})
    embeddings = ["classifier.class_emb", "classifier.positional_emb"]
    assert set(embeddings) <= set(groups["decay" if decay_embeddings else "no_decay"])
    assert not set(embeddings) & set(groups["no_decay" if decay_embeddings else "decay"])
    assert groups["quant"] == [n for n, _ in model.named_parameters() if n.endswith(".step")]
    assert "classifier.blocks.0.linear1.weight" in groups["decay"] and "classifier.norm.weight" in groups["no_decay"]


def test_decay_embeddings_defaults_to_the_original():
    assert OptimConfig().decay_embeddings is True


def test_optim_sgd_composes_and_steps_as_nesterov_sgd_with_l2_on_weights_only(tmp_path):
    o = OptimConfig(**as_dict(compose_config(["optim=sgd", "optim.lr=0.5"], tmp_path).optim))
    assert (o.name, o.lr, o.weight_decay, o.momentum, o.nesterov) == ("sgd", 0.5, 5e-4, 0.9, True)
    o.weight_decay = 0.1
    model = nn.Linear(2, 1)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = build_optimizer(param_groups(model, o.weight_decay, None), o)
    assert isinstance(opt, torch.optim.SGD)
    model(torch.ones(1, 2)).sum().backward()  # dL/dw = 1, dL/db = 1
    opt.step()
    # first step, zero buffer: buf = g; nesterov update g + momentum * buf = (1 + m) g, g with L2 on the weight
    m = o.momentum
    assert torch.allclose(model.weight, w0 - 0.5 * (1 + m) * (1 + 0.1 * w0))
    assert torch.allclose(model.bias, b0 - 0.5 * (1 + m) * torch.ones(1))


def test_optim_default_is_adamw(tmp_path):
    o = OptimConfig(**as_dict(compose_config([], tmp_path).optim))
    assert isinstance(build_optimizer(param_groups(nn.Linear(2, 1), 0.1, None), o), torch.optim.AdamW)
