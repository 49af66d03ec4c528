"""Log-fidelity options (reference §3.6, §3.1/§3.5, §2.8): use_relu signedness, the 'attn q' rows' default init
of qkv/proj, and native AMP for the log's experiments on CUDA."""
import pytest
import torch

from conftest import compose_config
from qat.models import create_model
from qat.quant import QuantConfig, QuantLinear, quantize_, quantizers

SEED = 123


def unsigned_inputs(model) -> set[str]:
    return {n.split(".")[-2] for n, q in quantizers(model) if n.endswith("act_quantizer") and not q.signed}


@pytest.mark.parametrize("options,unsigned", [
    ({"use_relu": True}, {"linear1", "linear2"}),  # the original: every module path with 'linear' (§3.6)
    ({"use_relu": True, "relu_unsigned": "post_relu"}, {"linear2"}),
    ({}, set()),  # GELU: all signed
])
def test_use_relu_makes_the_mlp_inputs_unsigned(options, unsigned):
    model = quantize_(create_model("vit_2_4_32", **options), QuantConfig(act={"bits": 2}))
    assert unsigned_inputs(model) == unsigned
    signed = {n.split(".")[-2] for n, q in quantizers(model) if q.signed}
    assert {"qkv", "proj"} <= signed and len(list(quantizers(model))) == 8
    levels = {(q.qmin, q.qmax) for n, q in quantizers(model) if n.split(".")[-2] in unsigned}
    assert levels <= {(0, 2)}


def seeded_vit():
    torch.manual_seed(SEED)
    return create_model("vit_2_4_32")


@pytest.mark.parametrize("default_init", [False, True])
def test_attn_default_init_resets_qkv_and_proj_only(default_init):
    reference = seeded_vit().state_dict()
    model = seeded_vit()
    quantize_(model, QuantConfig(act={"bits": 2}, attn={"bits": 2}, attn_default_init=default_init))
    state = model.state_dict()
    attn = model.classifier.blocks[0].self_attn
    assert isinstance(attn.qkv, QuantLinear) and isinstance(attn.proj, QuantLinear)
    for name in ("linear1.weight", "linear1.bias", "linear2.weight", "pre_norm.weight"):
        assert torch.equal(state[f"classifier.blocks.0.{name}"], reference[f"classifier.blocks.0.{name}"])
    for layer in (attn.qkv, attn.proj):
        key = f"classifier.blocks.0.self_attn.{'qkv' if layer is attn.qkv else 'proj'}.weight"
        assert torch.equal(layer.weight, reference[key]) is not default_init
    bound = 1 / 128 ** 0.5  # kaiming_uniform_(a=sqrt(5)) and the bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    if default_init:
        for w in (attn.qkv.weight, attn.proj.weight, attn.proj.bias):
            assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    else:
        assert attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05) and not attn.proj.bias.any()


def test_attn_default_init_needs_attention():
    with pytest.raises(ValueError, match="quant.attn_default_init=true but model CifarResNet has no attention"):
        quantize_(create_model("resnet20"), QuantConfig(act={"bits": 2}, attn_default_init=True))


def test_log_experiments_use_amp_only_on_cuda(tmp_path, monkeypatch):
    cfg = compose_config(["experiment=log/24259"], tmp_path)
    assert cfg.trainer.precision == ("16-mixed" if torch.cuda.is_available() else "32-true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.trainer.precision == "16-mixed"
    assert compose_config(["experiment=quickstart"], tmp_path).trainer.precision == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.trainer.precision == "32-true"
