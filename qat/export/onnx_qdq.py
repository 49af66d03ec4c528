"""ONNX export with QuantizeLinear/DequantizeLinear pairs, run by onnxruntime on CPU.

Exporter: torch.onnx.export(dynamo=False), the TorchScript exporter (the dynamo exporter needs onnxscript,
which is not installed offline); it writes opsets up to 20, so int4/uint4 Q/DQ (opset 21) is out of reach
and every code is stored in int8 (signed levels) or uint8 (unsigned), whatever the bit width.

Quantized layers are in the integer form of `qat.quant.integer`, the form the fake-quant model evaluates in:
[Clip ->] QuantizeLinear(x, s_a) -> DequantizeLinear(1) gives the activation codes, int8/uint8 weight
initializers -> DequantizeLinear(1) (per-channel: axis 0) the weight codes, then the float Conv/MatMul sums
integers (exact while partial sums stay below 2**24), one Mul by s_a * s_w and an Add of the bias. Attention
computes (Q K^T) * s_q s_k / sqrt(d) and (P V) * s_p s_v on codes the same way. The Clip (float, to the
b-bit levels' range) is left out when the levels fill int8/uint8. An LSQ+ offset that is an integer multiple
z of the step becomes the zero point -z (the codes are then level + z); a layer with any other offset keeps
the plain Q/DQ form (DQ scale = step, float op, float Sub/Add around the pair). 1-bit signed activations
(sign) have no Q/DQ form: float Where(x - offset >= 0, 1, -1).
"""
import copy
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qat.export.integer import POINTS, IntAttention, check_conv, unknown_layer
from qat.quant.integer import live, step_of
from qat.models.layers import Attention
from qat.quant import LSQQuantizer, QuantConv2d, QuantLinear

DEFAULT_OPSET = 17
MIN_OPSET = {"quant": 11, "per_channel": 13}  # Clip with min/max inputs: 11
INT4_OPSET = 21
TORCHSCRIPT_MAX_OPSET = 20


class _QDQ(torch.autograd.Function):
    """[Clip ->] QuantizeLinear(scale) -> DequantizeLinear(out_scale): out_scale = scale is fake quantization,
    out_scale = 1 gives the integer codes as floats."""

    @staticmethod
    def forward(ctx, x, scale, out_scale, zero_point, lo, hi, clip: bool):
        z = zero_point.float()
        if clip:
            x = x.clamp(lo, hi)
        info = torch.iinfo(zero_point.dtype)
        return (torch.round(x / scale) + z).clamp(info.min, info.max).sub(z).mul(out_scale)

    @staticmethod
    def symbolic(g, x, scale, out_scale, zero_point, lo, hi, clip: bool):
        if clip:
            x = g.op("Clip", x, lo, hi)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), out_scale, zero_point)


class _DQ(torch.autograd.Function):
    """(codes - zero_point) * scale, per channel along axis 0 when scale has more than one element."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point):
        view = (-1,) + (1,) * (codes.dim() - 1) if scale.numel() > 1 else ()
        return (codes.float() - zero_point.float().reshape(view)) * scale.reshape(view)

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        if scale.type().sizes() and scale.type().sizes()[0] > 1:
            return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)
        return g.op("DequantizeLinear", codes, scale, zero_point)


def zero_point(offset: torch.Tensor | None, scale: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype):
    """Zero points -offset/scale when every ratio is an integer and the stored range fits `dtype`, else None."""
    if offset is None:
        return torch.zeros_like(scale, dtype=dtype)
    ratio = offset.float().reshape(scale.shape) / scale
    z = ratio.round()
    info = torch.iinfo(dtype)
    if (ratio - z).abs().max() > 1e-6 or (-z).min() < info.min or (-z).max() > info.max:
        return None
    return (-z).to(dtype)


class QDQ(nn.Module):
    """An activation LSQQuantizer as [Clip ->] Q -> DQ (or float sign for 1-bit signed).

    The stored integer is the level (zero point -offset/step where that is an integer); the levels'
    range [qmin, qmax] is a float Clip of x to [(qmin - zp) * s, (qmax - zp) * s] before QuantizeLinear,
    left out when it is the whole int8/uint8 range, so Q -> DQ stays a plain pair that onnxruntime can
    fuse into integer kernels (MatMulIntegerToFloat).
    """

    def __init__(self, q: LSQQuantizer, codes: bool = False):
        super().__init__()
        self.binary, self.amax = q.binary, float(max(-q.qmin, q.qmax))
        dtype = torch.uint8 if q.qmin >= 0 else torch.int8
        scale = step_of(q).reshape(())
        offset = None if q.offset is None else q.offset.detach().float().reshape(())
        zp = zero_point(offset, scale, q.qmin, q.qmax, dtype)
        self.float_offset = offset is not None and (zp is None or self.binary)
        zp = zp if zp is not None and not self.float_offset else torch.zeros((), dtype=dtype)
        self.register_buffer("scale", scale)
        self.register_buffer("out_scale", torch.ones(()) if codes else scale)
        self.register_buffer("offset", offset if offset is not None else torch.zeros(()))
        self.register_buffer("zero_point", zp)
        self.clip = (q.qmin, q.qmax) != (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
        z = float(zp)
        self.register_buffer("lo", (q.qmin - z) * scale)
        self.register_buffer("hi", (q.qmax - z) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_offset:
            x = x - self.offset
        if self.binary:
            y = torch.where(x >= 0, self.out_scale, -self.out_scale)
        else:
            y = _QDQ.apply(x, self.scale, self.out_scale, self.zero_point, self.lo, self.hi, self.clip)
        return y + self.offset if self.float_offset else y


class QDQWeight(nn.Module):
    """A layer's quantized weight: int8/uint8 levels -> DequantizeLinear ((level - zp) * s = level * s + offset)."""

    def __init__(self, layer: nn.Module, codes: bool = False):
        super().__init__()
        q = live(layer.weight_quantizer)
        weight = layer.weight.detach()
        dtype = torch.uint8 if q.qmin >= 0 else torch.int8
        scale = step_of(q).expand(len(weight), *step_of(q).shape[1:]).reshape(-1)
        offset = None if q.offset is None else q.offset.detach().float().expand(len(weight), *q.offset.shape[1:])
        if not q.per_channel:
            scale, offset = scale[:1].reshape(()), None if offset is None else offset.reshape(-1)[:1].reshape(())
        zp = zero_point(offset, scale, q.qmin, q.qmax, dtype)
        self.float_offset = offset is not None and zp is None
        zp = torch.zeros_like(scale, dtype=dtype) if zp is None else zp
        view = (-1,) + (1,) * (weight.dim() - 1) if zp.dim() else ()
        self.register_buffer("codes", q.levels(weight).to(dtype))
        self.register_buffer("step", scale)  # the real step; the DQ scale is 1 in `codes` mode
        self.register_buffer("scale", torch.ones_like(scale) if codes else scale)
        self.register_buffer("zero_point", zp)
        self.register_buffer("offset", offset.reshape(view) if self.float_offset else torch.zeros(()))

    def forward(self) -> torch.Tensor:
        w = _DQ.apply(self.codes, self.scale, self.zero_point)
        return w + self.offset if self.float_offset else w


class QDQLayer(nn.Module):
    """QuantLinear/QuantConv2d in integer form: op(Q->DQ(1) codes of x + input_bias, DQ(1) weight codes), times
    s_a * s_w, plus bias, as `qat.quant.integer` computes it (exact integer sums while they stay below 2**24;
    float32 always: onnxruntime's Conv has no float64). With a non-integer (float) offset: the plain Q/DQ
    form, op(QDQ(x + input_bias), DQ(weight codes)) + bias."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        act, weight_q = live(layer.act_quantizer), live(layer.weight_quantizer)
        plain_qdq = (QDQ(act) if act is not None else None, QDQWeight(layer) if weight_q is not None else None)
        self.integer = not any(m.float_offset for m in plain_qdq if m is not None)
        self.act = QDQ(act, codes=self.integer) if act is not None else nn.Identity()
        self.weight = QDQWeight(layer, codes=self.integer) if weight_q is not None else None
        self.float_weight = None if self.weight is not None else nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.input_bias = None if layer.input_bias is None else nn.Parameter(layer.input_bias.detach().clone())
        self.conv = None if isinstance(layer, QuantLinear) else dict(stride=layer.stride, padding=layer.padding,
                                                                     dilation=layer.dilation, groups=layer.groups)
        view = (-1,) if self.conv is None else (-1, 1, 1)
        s_a = self.act.scale.reshape(-1) if act is not None else torch.ones(1)
        s_w = self.weight.step.expand(len(layer.weight)) if self.weight is not None else torch.ones(1)
        self.register_buffer("rescale", s_a * s_w.reshape(view))  # the product qat.quant.integer forms
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(len(layer.weight))
        self.register_buffer("bias_view", bias.reshape(view))

    def op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, bias) if self.conv is None else F.conv2d(x, w, bias, **self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_bias is not None:
            x = x + self.input_bias
        w = self.weight() if self.weight is not None else self.float_weight
        if self.integer:
            return self.op(self.act(x), w, None) * self.rescale + self.bias_view
        return self.op(self.act(x), w, self.bias)


def _qdq_tree(mod: nn.Module, path: str) -> nn.Module:
    """`mod` with quantized layers as QDQLayer and attention quantizers as QDQ (the layer itself if it is one)."""
    if isinstance(mod, (QuantLinear, QuantConv2d)):
        if isinstance(mod, QuantConv2d):
            check_conv(mod, path)
        return QDQLayer(mod)
    if isinstance(mod, Attention) and all(live(getattr(mod, n)) is not None and getattr(mod, n).offset is None
                                          for n in POINTS):  # integer form, as qat.quant.integer
        return IntAttention(mod, path, layer=_qdq_tree, codes=lambda q: QDQ(q, codes=True))
    for name, child in list(mod.named_children()):
        if isinstance(child, LSQQuantizer):
            if not isinstance(mod, Attention):
                raise unknown_layer(mod, path)
            setattr(mod, name, QDQ(child) if child.enabled else nn.Identity())
        else:
            setattr(mod, name, _qdq_tree(child, f"{path}.{name}" if path else name))
    return mod


def check_opset(model: nn.Module, opset: int, int4: bool = False) -> None:
    """Refuse, before any work, an opset that cannot hold the model's codes."""
    if int4:
        raise ValueError(f"int4/uint4 QuantizeLinear needs opset {INT4_OPSET}, but torch's TorchScript ONNX exporter "
                         f"(used offline) writes at most opset {TORCHSCRIPT_MAX_OPSET}: drop --onnx-int4 (codes of "
                         "<= 8 bits are stored in int8/uint8)")
    if not MIN_OPSET["quant"] <= opset <= TORCHSCRIPT_MAX_OPSET:
        raise ValueError(f"--opset={opset}: QuantizeLinear/DequantizeLinear need opset >= {MIN_OPSET['quant']} and "
                         f"the exporter writes at most {TORCHSCRIPT_MAX_OPSET}; use --opset {DEFAULT_OPSET}")
    per_channel = [n for n, m in model.named_modules() if isinstance(m, LSQQuantizer) and m.per_channel]
    if per_channel and opset < MIN_OPSET["per_channel"]:
        raise ValueError(f"--opset={opset} cannot hold per-channel weight scales ({per_channel[0]}, ...): "
                         f"DequantizeLinear with axis needs opset >= {MIN_OPSET['per_channel']}; use --opset "
                         f"{DEFAULT_OPSET}")


@torch.no_grad()
def to_qdq(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` whose quantizers and quantized layers are Q/DQ modules."""
    return _qdq_tree(copy.deepcopy(model).eval(), "").eval()


@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> bytes:
    """The ONNX bytes of `model` (fake-quant or FP) with a dynamic batch axis: input 'input', output 'logits'."""
    qdq = to_qdq(model)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(qdq, (example,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def ort_session(model_bytes_or_path, threads: int = 1):
    """An onnxruntime CPU InferenceSession with `threads` intra-op threads."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])


def ort_logits(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(["logits"], {"input": np.ascontiguousarray(x.numpy())})[0])
