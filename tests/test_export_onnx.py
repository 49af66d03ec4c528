"""qat.export ONNX: onnxruntime runs the Q/DQ graph equal to the fake-quant model; the CLI end to end."""
import dataclasses
import json

import onnx
import pytest
import torch
from onnx import TensorProto

from qat.export.__main__ import main
from qat.export.onnx_qdq import export_onnx, ort_logits, ort_session
from qat.models import create_model
from qat.quant import QuantConfig, QuantConv2d, QuantizerConfig, QuantLinear, quantize_

W2A2 = QuantConfig(weight=dict(bits=2), act=dict(bits=2))
ACT2B_ATTN = QuantConfig(act=dict(bits=2), attn=dict(bits=2))
W2A2_ATTN = QuantConfig(weight=dict(bits=2), act=dict(bits=2), attn=dict(bits=2))


def calibrated_model(name: str, config: QuantConfig | None, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name)
    if config is not None:
        quantize_(model, config)
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))
    return model.eval()


def run_onnx(model, x):
    data = export_onnx(model, x[:1])
    return onnx.load_from_string(data), ort_logits(ort_session(data), x)


@pytest.mark.parametrize("name,config,qdq", [("vit_2_4_32", W2A2, (8, 16)), ("vit_2_4_32", ACT2B_ATTN, (16, 16)),
                                             ("resnet20", W2A2, (18, 36))])
def test_onnxruntime_equals_fake_quant(name, config, qdq):
    model = calibrated_model(name, config)
    x = torch.randn(8, 3, 32, 32)
    graph, logits = run_onnx(model, x)
    ops = [n.op_type for n in graph.graph.node]
    assert (ops.count("QuantizeLinear"), ops.count("DequantizeLinear")) == qdq  # acts Q+DQ; weights DQ only
    with torch.no_grad():
        reference = model(x)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(logits.argmax(1), reference.argmax(1))


def test_weights_are_int8_codes_with_per_channel_scales():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(8, 4), QuantizerConfig(bits=4, per_channel=True),
                                   QuantizerConfig(bits=4))
    x = torch.randn(5, 8)
    with torch.no_grad():
        layer.train()(x)
    layer.eval()
    graph, logits = run_onnx(layer, x)
    codes = [t for t in graph.graph.initializer if t.data_type == TensorProto.INT8 and list(t.dims) == [4, 8]]
    assert len(codes) == 1
    assert torch.equal(torch.tensor(onnx.numpy_helper.to_array(codes[0])).float(),
                       layer.weight_quantizer.levels(layer.weight))
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == codes[0].name]
    assert [a.i for a in dq[0].attribute if a.name == "axis"] == [0]
    with torch.no_grad():
        torch.testing.assert_close(logits, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 8])
def test_offsets_that_are_step_multiples_become_zero_points(bits):
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(8, 4), QuantizerConfig(bits=bits, per_channel=True,
                                                                          learnable_offset=True),
                                   QuantizerConfig(bits=bits, learnable_offset=True))
    x = torch.randn(64, 8) * 3
    with torch.no_grad():
        layer.train()(x)
        w, a = layer.weight_quantizer, layer.act_quantizer
        w.offset.copy_(torch.tensor([-1.0, 0.0, 2.0, 1.0])[:, None] * w.step)  # zero points 1, 0, -2, -1
        a.offset.copy_(-3 * a.step)  # zero point 3
    layer.eval()
    graph, logits = run_onnx(layer, x)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    zero_points = [arrays[n.input[2]].tolist() for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert sorted(zero_points, key=str) == [3, [1, 0, -2, -1]]  # activation, then weight per channel
    assert "Sub" not in {n.op_type for n in graph.graph.node}  # no float offset around the pairs
    with torch.no_grad():
        torch.testing.assert_close(logits, layer(x), atol=1e-5, rtol=1e-5)


def test_fp_onnx_export_runs():
    model = calibrated_model("resnet20", None)
    x = torch.randn(4, 3, 32, 32)
    graph, logits = run_onnx(model, x)
    assert "QuantizeLinear" not in {n.op_type for n in graph.graph.node}
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), atol=1e-4, rtol=1e-4)


def save_run_checkpoint(path, name: str, config: QuantConfig | None):
    """A checkpoint in the run format qat.load_model reads."""
    model = calibrated_model(name, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "qat": {"model": {"name": name}, "quant": dataclasses.asdict(config) if config else None,
                        "num_classes": 10}}, path)


def test_cli_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    save_run_checkpoint(run / "checkpoints" / "best.ckpt", "vit_2_4_32", W2A2_ATTN)
    assert main([str(run), "--format", "all", "--check", "10"]) == 0
    out = run / "export"
    assert sorted(p.name for p in out.iterdir()) == ["check.json", "model.onnx", "model_int.pt", "model_int.ts",
                                                     "model_packed.pt", "size_report.json"]
    check = json.loads((out / "check.json").read_text())
    assert check["n"] == 10 and check["int"]["top1_agreement"] == 1.0 and check["onnx"]["top1_agreement"] == 1.0
    assert check["int"]["max_abs_diff"] < 1e-4 and check["onnx"]["max_abs_diff"] < 1e-4
    sizes = json.loads((out / "size_report.json").read_text())
    assert sizes["quantized_layers"]["ratio"] == pytest.approx(16, rel=0.01)  # 2-bit codes vs float32
    int_model = torch.jit.load(str(out / "model_int.ts"))
    assert int_model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    assert "top-1 agreement 1.0000" in capsys.readouterr().out


def test_cli_refuses_fp_checkpoint_for_int_before_writing(tmp_path, capsys):
    ckpt = tmp_path / "fp.ckpt"
    save_run_checkpoint(ckpt, "resnet20", None)
    assert main([str(ckpt), "--format", "packed", "--check", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to export as integers" in err and "--format onnx" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.ckpt"]
    assert main([str(ckpt), "--format", "onnx", "--check", "4"]) == 0
    assert (tmp_path / "export" / "model.onnx").is_file()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_onnxruntime_integer_layers_equal_the_eval_forward_bit_for_bit(kind):
    """Integer codes summed by onnxruntime's float Conv/MatMul are exact: the same numbers as the torch eval."""
    torch.manual_seed(0)
    w, a = QuantizerConfig(bits=4, per_channel=True), QuantizerConfig(bits=4, signed=False)
    if kind == "linear":
        layer, x = QuantLinear.from_float(torch.nn.Linear(96, 32), w, a, act_signed=False), torch.rand(16, 7, 96) * 3
    else:
        layer = QuantConv2d.from_float(torch.nn.Conv2d(16, 32, 3, padding=1), w, a, act_signed=False)
        x = torch.rand(8, 16, 12, 12) * 3
    with torch.no_grad():
        layer.train()(x)
    layer.eval()
    graph, logits = run_onnx(layer, x)
    with torch.no_grad():
        assert torch.equal(logits, layer(x))  # two implementations, one result
