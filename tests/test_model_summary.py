"""quant_summary: every quantized layer with its bits, signedness, per-channel and initial step; FP layers left out."""
import torch

from qat.model_summary import quant_rows, quant_summary
from qat.models import create_model
from qat.quant import QuantConfig, QuantLayerMixin, quantize_

W2A2_ATTN = QuantConfig(weight={"bits": 2, "per_channel": True}, act={"bits": 2}, attn={"bits": 2})


def test_summary_lists_every_quantized_layer_and_the_float_ones_left_out():
    torch.manual_seed(0)
    model = quantize_(create_model("vit_2_4_32"), W2A2_ATTN)
    rows, left_out = quant_rows(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]
    assert [r[0] for r in rows if r[1] == "QuantLinear"] == layers and len(layers) == 8
    assert sorted(r[0].rsplit(".", 1)[1] for r in rows if r[1] == "point") == sorted(["q_quant", "k_quant", "v_quant",
                                                                                      "attn_quant"] * 2)
    assert left_out == ["tokenizer.conv_layers.0.0 (Conv2d)", "classifier.fc (Linear)"]
    qkv = dict(zip(["name", "type", "w", "a", "sign", "per_channel", "w_step", "a_step"], rows[0]))
    assert qkv == {"name": "classifier.blocks.0.self_attn.qkv", "type": "QuantLinear", "w": "2b [-1,1]",
                   "a": "2b [-1,1]", "sign": "signed", "per_channel": "yes (384)", "w_step": "uninit",
                   "a_step": "uninit"}
    probs = next(r for r in rows if r[0].endswith("attn_quant"))
    assert probs[3:5] == ["2b [0,2]", "unsigned"]

    model.train()(torch.randn(4, 3, 32, 32))  # calibration initialises the steps
    rows, _ = quant_rows(model)
    layer = model.get_submodule(layers[0])
    w_step, a_step = layer.weight_quantizer.step.detach(), layer.act_quantizer.step.detach()
    assert rows[0][6] == f"{w_step.mean().item():.4g} ({w_step.min().item():.3g}..{w_step.max().item():.3g})"
    assert rows[0][7] == f"{a_step.item():.4g}"
    text = quant_summary(model)
    assert text.splitlines()[0] == "quantized: 16 layer(s) / point(s)" and len(text.splitlines()) == 3 + 16 + 1
    assert text.splitlines()[-1].startswith("left in full precision: 2: tokenizer.conv_layers.0.0 (Conv2d)")


def test_summary_of_a_float_model_and_of_act_only_quantization():
    rows, left_out = quant_rows(create_model("vit_2_4_32"))
    assert rows == [] and len(left_out) == 2 + 8 + 8  # conv + fc, 8 Linear, 4 points per block
    act_only = quantize_(create_model("vit_2_4_32"), QuantConfig(act={"bits": 4, "symmetric": False}))
    rows, _ = quant_rows(act_only)
    assert {tuple(r[2:6]) for r in rows} == {("fp", "4b [-8,7]", "signed", "-")}
