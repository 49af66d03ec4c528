"""Seed 004's ViT PTQ settings: head/stem at 8 bits, the step floor eps, FP-first evaluation, group-wise inputs."""
import json

import pytest
import torch

import qat
from bench import groups_bench
from qat.builders import build_quant
from qat.export.exporter import export
from qat.models import create_model
from qat.ptq import pipeline
from qat.ptq.calibrate import calibrate, observe_, rows_of
from qat.ptq.observers import Stats, create_observer
from qat.quant import LSQQuantizer, QuantConfig, QuantizerConfig, QuantLayerMixin, calibrate_, quantize_, quantizers
from qat.quant.groups import GroupQuantizer, assign_by_range, post_norm_linears
from tests.conftest import compose_config
from tests.test_ptq_pipeline import _sample_test, fp_run, ptq  # noqa: F401 (fp_run is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU

W4A4 = {"weight": {"bits": 4}, "act": {"bits": 4}}
TIMM_TINY = {"vit_tiny_patch16_224": {"img_size": 32, "depth": 2},
             "swin_tiny_patch4_window7_224": {"img_size": 32, "depths": (2, 2), "num_heads": (3, 6), "window_size": 2,
                                              "embed_dim": 24}}


@pytest.fixture
def saved(monkeypatch) -> dict:
    """{"model": the quantized model ptq.py saved}, filled by a spy on pipeline.save_run."""
    found = {}
    save_run = pipeline.save_run
    monkeypatch.setattr(pipeline, "save_run", lambda d, model, *a: found.update(model=model) or save_run(d, model, *a))
    return found


def levels(model) -> dict[str, tuple]:
    """{layer: ((weight qmin, qmax), (act qmin, qmax))} of every quantized layer."""
    return {n: ((m.weight_quantizer.qmin, m.weight_quantizer.qmax), (m.act_quantizer.qmin, m.act_quantizer.qmax))
            for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


@pytest.mark.parametrize("name,eight_bit,total", [
    ("vit_2_4_32", ["tokenizer.conv_layers.0.0", "classifier.fc"], 10),
    ("cct_2_3x2_32", ["tokenizer.conv_layers.0.0", "tokenizer.conv_layers.1.0", "classifier.attention_pool",
                      "classifier.fc"], 12),
    ("resnet20", ["conv1", "fc"], 20),
    ("vit_tiny_patch16_224", ["model.patch_embed.proj", "model.head"], 10),
    ("swin_tiny_patch4_window7_224", ["model.patch_embed.proj", "model.head.fc"], 19),
])
def test_head_stem_bits_quantizes_every_layer_with_stem_and_head_at_8_bits(name, eight_bit, total):
    model = quantize_(create_model(name, **TIMM_TINY.get(name, {})), QuantConfig(**W4A4, head_stem_bits=8))
    found = levels(model)
    assert len(found) == total == sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    assert sorted(n for n, lv in found.items() if lv == ((-127, 127), (-127, 127))) == sorted(eight_bit)
    rest = {lv for n, lv in found.items() if n not in eight_bit}
    assert rest == {((-7, 7), (-7, 7))} or (name == "resnet20" and rest == {((-7, 7), (0, 14))})


def test_head_stem_keeps_the_other_settings_and_exclude_wins():
    config = QuantConfig(weight={"bits": 3, "per_channel": True}, act={"bits": 4, "symmetric": False},
                         head_stem_bits=8, exclude=["classifier.fc"])
    model = quantize_(create_model("vit_2_4_32"), config)
    stem = model.tokenizer.conv_layers[0][0]
    assert stem.weight_quantizer.step.shape == (128, 1, 1, 1) and (stem.act_quantizer.qmin, stem.act_quantizer.qmax) \
        == (-128, 127)
    assert not isinstance(model.classifier.fc, QuantLayerMixin)


def test_head_stem_without_it_leaves_stem_and_head_fp():
    assert set(levels(quantize_(create_model("vit_2_4_32"), QuantConfig(**W4A4)))) == {
        f"classifier.blocks.{i}.{layer}" for i in range(2)
        for layer in ("self_attn.qkv", "self_attn.proj", "linear1", "linear2")}


@pytest.mark.parametrize("kwargs,match", [
    ({"head_stem_bits": 1, **W4A4}, r"quant.head_stem_bits=1 is not supported: use an integer in 2..8"),
    ({"head_stem_bits": 8, "attn": {"bits": 4}}, r"quant.head_stem_bits=8 .* set quant.weight and/or quant.act"),
])
def test_head_stem_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_head_stem_bits_is_a_qat_key(tmp_path):
    cfg = compose_config(["model=vit_2_4_32", "quant=w4a4", "quant.head_stem_bits=8"], tmp_path)
    model = quantize_(create_model("vit_2_4_32"), build_quant(cfg.quant))
    assert levels(model)["classifier.fc"] == ((-127, 127), (-127, 127))


def test_eps_floors_every_step_after_calibration_on_zeros():
    config = QuantConfig(weight={"bits": 4, "eps": 1e-4}, act={"bits": 4, "eps": 1e-4})
    model = quantize_(create_model("vit_2_4_32"), config)
    for p in model.parameters():
        p.data.zero_()
    calibrate(model, [torch.zeros(2, 3, 32, 32)], create_observer("minmax"))
    steps = {n: q.step.detach() for n, q in quantizers(model)}
    assert len(steps) == 16 and all(q.eps == 1e-4 for _, q in quantizers(model))
    assert all(torch.equal(s, torch.full_like(s, 1e-4)) for s in steps.values())


def test_eps_default_is_unchanged():
    assert QuantizerConfig(bits=4).eps == 1e-5 == LSQQuantizer(4).eps
    with pytest.raises(ValueError, match=r"eps=0 is not supported: the step floor must be a number > 0"):
        QuantizerConfig(bits=4, eps=0)


def test_ptq_run_with_head_stem_eps_and_no_fp_evaluation(fp_run, tmp_path, monkeypatch):
    calls = []
    evaluate = pipeline.evaluate
    monkeypatch.setattr(pipeline, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
    summary = ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a4", "ptq=mse_channel", "ptq.head_stem_8bit=true",
                  "ptq.eps=1e-4", "ptq.test_before_calibration=false")
    assert summary["fp_acc"] is None and len(calls) == 1
    assert summary["quant"]["head_stem_bits"] == 8 and summary["quant"]["act"]["eps"] == 1e-4
    model = qat.load_model(tmp_path)
    assert levels(model)["classifier.fc"] == levels(model)["tokenizer.conv_layers.0.0"] == ((-127, 127), (-127, 127))
    assert {q.eps for _, q in quantizers(model)} == {1e-4}
    assert pipeline.evaluate(model, _sample_test()) == pytest.approx(summary["quant_acc"])


def test_ptq_without_head_stem_8bit_keeps_quant_head_stem_bits(fp_run, tmp_path):
    summary = ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a4", "ptq=mse_channel", "quant.head_stem_bits=4")
    assert summary["quant"]["head_stem_bits"] == 4
    found = levels(qat.load_model(tmp_path))
    assert found["classifier.fc"] == found["tokenizer.conv_layers.0.0"] == ((-7, 7), (-7, 7))


@pytest.mark.parametrize("override,match", [
    ("quant.head_stem_bits=4", r"ptq.head_stem_8bit=true puts the stem and head at 8 bits but quant.head_stem_bits=4"),
    ("ptq.eps=0", r"ptq.eps=0: the step floor must be a number > 0"),
    ("ptq.head_stem_8bit=8", r"ptq.head_stem_8bit=8: choose true"),
    ("ptq.test_before_calibration=maybe", r"ptq.test_before_calibration='maybe': choose true"),
    ("ptq.n_groups=0", r"ptq.n_groups=0: use an integer >= 1"),
    ("ptq.dynamic_groups=1", r"ptq.dynamic_groups=1: choose true"),
    ("ptq.dynamic_groups=true", r"quant.dynamic_groups=true assigns channels to groups at run time: set quant.n_groups"),
    ("ptq.n_groups=200", r"quant.n_groups=200: use an integer in 1..128"),
])
def test_bad_seed004_keys_fail_before_work(fp_run, tmp_path, monkeypatch, override, match):
    monkeypatch.setattr(pipeline, "evaluate", lambda *a: pytest.fail("evaluated before the error"))
    with pytest.raises(ValueError, match=match):
        ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a4", override,
            *(["ptq.head_stem_8bit=true"] if override.startswith("quant.head_stem_bits") else []))


def fixed_stats(x: torch.Tensor, q) -> Stats:
    return Stats.of(rows_of(x, q))


def tokens(seed=0, channels=8) -> torch.Tensor:
    """(4, 16, C) tokens whose channel c has scale c + 1."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, channels, generator=gen) * torch.arange(1, channels + 1)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_groups_equal_to_channels_is_per_channel_fake_quant(observer):
    x = tokens()
    group, channel = GroupQuantizer(4, 8, 8), LSQQuantizer(4, per_channel=True, channels=8, ch_axis=-1)
    for q in (group, channel):
        observe_(q, fixed_stats(x, q), create_observer(observer))
    assert torch.equal(group.step[group.assignment], channel.step)
    assert torch.equal(group.eval()(x), channel.eval()(x))


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_one_group_is_per_tensor_fake_quant(observer):
    x = tokens()
    group, tensor = GroupQuantizer(4, 8, 1), LSQQuantizer(4)
    for q in (group, tensor):
        observe_(q, fixed_stats(x, q), create_observer(observer))
    assert torch.equal(group.step, tensor.step) and torch.equal(group.eval()(x), tensor.eval()(x))


def test_assignment_groups_channels_by_range():
    x = torch.randn(2, 5, 8).clamp(-1, 1)
    x[0, 0] = torch.tensor([5.0, 1, 7, 3, 8, 2, 6, 4])  # max|x| of channel c; the rest is inside [-1, 1]
    expected = torch.tensor([2, 0, 3, 1, 3, 0, 2, 1])  # ranks 1..8 in pairs
    calibrated = GroupQuantizer(4, 8, 4)
    observe_(calibrated, fixed_stats(x, calibrated), create_observer("minmax"))
    assert torch.equal(calibrated.assignment, expected)
    assert torch.allclose(calibrated.step, torch.tensor([2.0, 4, 6, 8]) / 7)
    initialized = GroupQuantizer(4, 8, 4, init="minmax").train()
    initialized(x)  # QAT: the first train-mode batch sets assignment and steps
    assert torch.equal(initialized.assignment, expected) and torch.allclose(initialized.step, calibrated.step)
    assert torch.equal(assign_by_range(torch.tensor([3.0, 1, 2]), 2), torch.tensor([1, 0, 0]))


def test_dynamic_assignment_picks_the_closest_step_per_instance():
    q = GroupQuantizer(4, 4, 2, dynamic=True)
    observe_(q, Stats.of(torch.tensor([[0.7, -0.7], [7.0, -7.0], [0.7, -0.7], [7.0, -7.0]])), create_observer("minmax"))
    assert torch.equal(q.assignment, torch.tensor([0, 1, 0, 1])) and torch.allclose(q.step, torch.tensor([0.1, 1.0]))
    x = torch.tensor([[[0.7, 7.0, 0.3, -5.0]], [[-6.0, 0.2, 4.9, 0.5]]])  # (B=2, N=1, C=4)
    # needed steps range / 7: 0.1, 1, 0.04, 0.71 | 0.86, 0.03, 0.7, 0.07 -> closest of (0.1, 1.0)
    assert torch.equal(q.instance_assignment(x).flatten(1), torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]]))
    steps = q.step.detach()[torch.tensor([[[0, 1, 0, 1]], [[1, 0, 1, 0]]])]
    assert torch.equal(q.eval()(x), (x / steps).round().clamp(-7, 7) * steps)
    q.dynamic = False
    static = q.step.detach()[q.assignment]
    assert torch.equal(q(x), (x / static).round().clamp(-7, 7) * static)


@pytest.mark.parametrize("name", ["vit_2_4_32", "cct_2_3x2_32", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_groups_sit_on_the_post_layernorm_inputs(name):
    model = create_model(name, **TIMM_TINY.get(name, {}))
    expected = {"vit_2_4_32": ["classifier.blocks.0.self_attn.qkv", "classifier.blocks.0.linear1",
                               "classifier.blocks.1.self_attn.qkv", "classifier.blocks.1.linear1"],
                "vit_tiny_patch16_224": ["model.blocks.0.attn.qkv", "model.blocks.0.mlp.fc1", "model.blocks.1.attn.qkv",
                                         "model.blocks.1.mlp.fc1"],
                "swin_tiny_patch4_window7_224": [f"model.layers.{i}.blocks.{j}.{layer}" for i in (0, 1) for j in (0, 1)
                                                 for layer in ("attn.qkv", "mlp.fc1")]
                + ["model.layers.1.downsample.reduction"]}
    expected["cct_2_3x2_32"] = expected["vit_2_4_32"]
    assert sorted(post_norm_linears(model)) == sorted(expected[name])
    quantize_(model, QuantConfig(**W4A4, n_groups=4, head_stem_bits=8))
    grouped = {n.rpartition(".")[0] for n, q in quantizers(model) if isinstance(q, GroupQuantizer)}
    assert grouped == set(expected[name])
    assert all(q.step.shape == (4,) for n, q in quantizers(model) if isinstance(q, GroupQuantizer))


@pytest.mark.parametrize("kwargs,match", [
    ({"model": "resnet20", "n_groups": 2}, r"quant.n_groups=2: CifarResNet has no selected Linear layer that reads"),
    ({"model": "vit_2_4_32", "n_groups": 129}, r"quant.n_groups=129: use an integer in 1..128"),
    ({"model": "vit_2_4_32", "n_groups": 0}, r"quant.n_groups=0 is not supported: use an integer >= 1"),
    ({"model": "vit_2_4_32", "dynamic_groups": True}, r"quant.dynamic_groups=true .* set quant.n_groups"),
])
def test_group_config_errors(kwargs, match):
    model = create_model(kwargs.pop("model"))
    with pytest.raises(ValueError, match=match):
        quantize_(model, QuantConfig(**W4A4, **kwargs))


@pytest.mark.parametrize("dynamic", [False, True])
def test_ptq_run_with_groups_saves_a_checkpoint_that_loads_with_the_same_logits(fp_run, tmp_path, saved, dynamic):
    summary = ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a4", "ptq=mse_layer", "ptq.n_groups=2",
                  f"ptq.dynamic_groups={str(dynamic).lower()}")
    assert summary["quant"]["n_groups"] == 2 and summary["quant"]["dynamic_groups"] is dynamic
    model = qat.load_model(tmp_path)
    groups = [q for _, q in quantizers(model) if isinstance(q, GroupQuantizer)]
    assert len(groups) == 4 and all(q.dynamic is dynamic and q.step.shape == (2,) for q in groups)
    assert sorted(set(groups[0].assignment.tolist())) == [0, 1] and bool(groups[0].initialized)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), saved["model"].eval()(x))
    assert pipeline.evaluate(model, _sample_test()) == pytest.approx(summary["quant_acc"])


def test_groups_bench_small(tmp_path):
    result = groups_bench.main(["--small", "--threads", "1", "--out", str(tmp_path)])
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["per-tensor", "static groups", "dynamic groups"]
    assert [r["groups"] for r in rows.values()] == [0, 4, 4] and rows["per-tensor"]["ratio"]["all"] == [1.0, 1.0]
    assert all(len(r["ratio"]["all"]) == 2 for r in rows.values())
    assert (tmp_path / "groups_bench.md").read_text().startswith("Machine: ")
    assert json.loads((tmp_path / "groups_bench.json").read_text())["model"] == "vit_2_4_32"


def test_vit_ptq_preset_is_seed_004(fp_run, tmp_path):
    summary = ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a4", "ptq=vit_ptq")
    method, quant = summary["method"], summary["quant"]
    assert method["observer"] == {"name": "mse", "p": 2.0} and summary["fp_acc"] is not None
    assert quant["weight"]["per_channel"] and not quant["act"]["per_channel"]
    assert (quant["head_stem_bits"], quant["n_groups"], quant["dynamic_groups"]) == (8, 8, False)
    assert quant["weight"]["eps"] == quant["act"]["eps"] == 1e-4
    model = qat.load_model(tmp_path)
    groups = {n for n, q in quantizers(model) if isinstance(q, GroupQuantizer)}
    assert len(groups) == 4 and all(q.step.shape == (8,) for n, q in quantizers(model) if n in groups)
    assert levels(model)["classifier.fc"] == ((-127, 127), (-127, 127))


def test_group_inputs_are_refused_by_the_integer_export(fp_run, tmp_path):
    ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a4", "ptq=minmax_layer", "ptq.n_groups=2")
    match = r"classifier.blocks.0.self_attn.qkv .* has group-wise \(quant.n_groups\) activation steps: .*ptq.n_groups"
    with pytest.raises(ValueError, match=match):
        export(tmp_path, "int", check=0)


@pytest.mark.parametrize("dynamic", [False, True])
def test_groups_train_in_qat(tmp_path, dynamic):
    cfg = compose_config(["model=vit_2_4_32", "quant=w4a4", "quant.n_groups=4",
                          f"quant.dynamic_groups={str(dynamic).lower()}"], tmp_path)
    torch.manual_seed(0)
    model = quantize_(create_model("vit_2_4_32"), build_quant(cfg.quant))
    assert calibrate_(model, [torch.randn(8, 3, 32, 32)])  # QAT init: the first train-mode batch
    q = model.classifier.blocks[0].linear1.act_quantizer
    assert isinstance(q, GroupQuantizer) and q.dynamic is dynamic
    assert sorted(q.assignment.bincount().tolist()) == [32] * 4
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert q.step.grad.shape == (4,) and bool(q.step.grad.isfinite().all())
    assert dynamic or bool((q.step.grad != 0).all())  # static: every group holds channels


def test_head_groups_equal_to_heads_are_per_head_fake_quant():
    probs = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0)).mul(torch.arange(1.0, 5)[:, None, None])
    probs = probs.softmax(-1)
    group = GroupQuantizer(4, 4, 4, signed=False, ch_axis=-3)
    head = LSQQuantizer(4, signed=False, per_channel=True, channels=4, ch_axis=-3)
    for q in (group, head):
        observe_(q, fixed_stats(probs, q), create_observer("mse"))
    assert torch.equal(group.step[group.assignment], head.step.flatten())
    assert torch.equal(group.eval()(probs), head.eval()(probs))
    group.dynamic = True
    assert group.instance_assignment(probs).shape == (2, 4) and group(probs).shape == probs.shape


@pytest.mark.parametrize("dynamic", [False, True])
def test_ptq_run_with_attention_and_head_groups_loads_with_the_same_logits(fp_run, tmp_path, saved, dynamic):
    summary = ptq(tmp_path, f"ckpt={fp_run}", "quant=act4b_attn", "ptq=vit_ptq", "ptq.n_groups=4",
                  f"ptq.dynamic_groups={str(dynamic).lower()}")
    assert summary["quant"]["attn"]["eps"] == 1e-4 and summary["quant_mse"]
    model = qat.load_model(tmp_path)
    probs = model.classifier.blocks[1].self_attn.attn_quant
    assert isinstance(probs, GroupQuantizer) and probs.step.shape == (2,) and probs.assignment.shape == (2,)
    assert (probs.qmin, probs.qmax, probs.dynamic, bool(probs.initialized)) == (0, 14, dynamic, True)
    assert model.classifier.blocks[1].self_attn.q_quant.step.shape == (1,)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), saved["model"].eval()(x))


def test_ptq_attention_without_groups_and_bad_attention_bits(fp_run, tmp_path):
    ptq(tmp_path / "a", f"ckpt={fp_run}", "quant=act4b_attn")
    model = qat.load_model(tmp_path / "a")
    assert sum(type(q) is LSQQuantizer and q.name.endswith("attn_quant") for _, q in quantizers(model)) == 2
    with pytest.raises(ValueError, match=r"quant.attn.bits=1: PTQ supports 2..8 bits"):
        ptq(tmp_path / "b", f"ckpt={fp_run}", "quant=act4b_attn", "quant.attn.bits=1")


@pytest.mark.parametrize("method", ["awq", "mse_channel ptq.bias_correct=true", "mse_channel ptq.bias_correct=variance",
                                    "adaround", "brecq", "qdrop", "adaqtransform"])
def test_weight_methods_and_reconstruction_with_attention_and_groups(fp_run, tmp_path, saved, method):
    ptq_name, *extra = method.split()
    ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a4", f"ptq={ptq_name}", "+quant.attn={bits:4,symmetric:true}",
        "ptq.n_groups=2", *extra)
    model = qat.load_model(tmp_path)
    attn = [q for n, q in quantizers(model) if n.endswith(("q_quant", "k_quant", "v_quant", "attn_quant"))]
    assert len(attn) == 8 and all(bool(q.initialized) for q in attn)
    assert sum(isinstance(q, GroupQuantizer) for _, q in quantizers(model)) >= 4
    fp = qat.load_model(fp_run).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, y_fp = model(x), fp(x)
        assert torch.equal(y, saved["model"].eval()(x))
        assert float((y - y_fp).norm() / y_fp.norm()) < 0.1  # W4A4 + 4-bit attention: about 0.03 on this model
