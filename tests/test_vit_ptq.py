"""Seed 004's ViT PTQ settings: head/stem at 8 bits, the step floor eps, FP-first evaluation, group-wise inputs."""
import pytest
import torch

import qat
from qat.ptq import pipeline

from qat.builders import build_quant
from qat.models import create_model
from qat.ptq.calibrate import calibrate
from qat.ptq.observers import create_observer
from qat.quant import LSQQuantizer, QuantConfig, QuantizerConfig, QuantLayerMixin, quantize_, quantizers
from tests.conftest import compose_config
from tests.test_ptq_pipeline import _sample_test, fp_run, ptq  # noqa: F401 (fp_run is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU

W4A4 = {"weight": {"bits": 4}, "act": {"bits": 4}}
TIMM_TINY = {"vit_tiny_patch16_224": {"img_size": 32, "depth": 2},
             "swin_tiny_patch4_window7_224": {"img_size": 32, "depths": (2, 2), "num_heads": (3, 6), "window_size": 2,
                                              "embed_dim": 24}}


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


@pytest.mark.parametrize("override,match", [
    ("ptq.eps=0", r"ptq.eps=0: the step floor must be a number > 0"),
    ("ptq.head_stem_8bit=8", r"ptq.head_stem_8bit=8: choose true"),
    ("ptq.test_before_calibration=maybe", r"ptq.test_before_calibration='maybe': choose true"),
])
def test_bad_seed004_keys_fail_before_work(fp_run, tmp_path, monkeypatch, override, match):
    monkeypatch.setattr(pipeline, "evaluate", lambda *a: pytest.fail("evaluated before the error"))
    with pytest.raises(ValueError, match=match):
        ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a4", override)
