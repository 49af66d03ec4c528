"""Integer form of a quantized layer: an exact matmul/conv on integer codes, then one rescale plus bias.

    y = s_a * s_w * (A * W)  [+ s_a * o_w * (A * 1)]  [+ o_a * (1 * Q_w(W))]  + bias

A = activation levels (`LSQQuantizer.levels`), W = weight levels (int8/uint8 storage), `*` the layer's
matmul/conv; the bracketed LSQ+ offset terms appear only where the quantizer has an offset (for Linear the
activation-offset term is a constant folded into the bias). The codes are small integers held in float
tensors: a sum of integers is exact in float32 while every partial sum stays below 2**24, so a product
accumulates in float32 when K * max|A| * max|W| <= 2**24 and in float64 (exact to 2**53) otherwise.
A side that is not quantized (a float activation or weight) enters with scale 1 and is not exact.

Fake-quant layers evaluate in this form too (eval mode, no grad, `integer_ready`): a sum of float products
level * step depends on the order the kernel adds them, an integer sum does not, so the evaluated model and
the exported integer model (`qat.export.integer`) compute the same numbers, not numbers within rounding.
"""
import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.quantizers import LSQQuantizer

EXACT_FLOAT32 = 2.0 ** 24


def acc_dtype(k: int, amax_a: float, amax_b: float) -> torch.dtype:
    """float32 when dot products of length k of integers bounded by amax_a, amax_b are exact in float32,
    else float64; float32 when a side is float (amax 0: nothing to keep exact)."""
    if amax_a == 0.0 or amax_b == 0.0 or k * amax_a * amax_b <= EXACT_FLOAT32:
        return torch.float32
    return torch.float64


def live(q) -> LSQQuantizer | None:
    """The quantizer if it is an enabled LSQQuantizer (else the tensor passes as float)."""
    return q if isinstance(q, LSQQuantizer) and q.enabled else None


def step_of(q: LSQQuantizer) -> torch.Tensor:
    """max(step, eps) in float32, as the forward divides by it."""
    return q.step.detach().float().clamp_min(q.eps)


def plain(q, per_channel_ok: bool) -> bool:
    """q is nn.Identity, or an initialised, unhooked per-tensor (or, for weights, per-channel) LSQQuantizer."""
    if type(q) is nn.Identity:
        return True
    return (type(q) is LSQQuantizer and q.fusable() and q.is_initialized
            and (per_channel_ok or not q.per_channel))


def integer_ready(layer: nn.Module) -> bool:
    """Whether an eval forward of a QuantLinear/QuantConv2d runs in integer form: no grad, eval mode, at least
    one live quantizer, a per-tensor input quantizer and plain LSQ quantizers (not a reconstruction weight,
    a group quantizer or one observed by hooks)."""
    return (not layer.training and not torch.is_grad_enabled() and getattr(layer, "padding_mode", "zeros") == "zeros"
            and plain(layer.weight_quantizer, True) and plain(layer.act_quantizer, False)
            and (live(layer.weight_quantizer) is not None or live(layer.act_quantizer) is not None))


def attention_ready(attn: nn.Module) -> bool:
    """Whether an eval forward of Attention runs `attention_on_codes`: no grad, eval mode, q, k, v and softmax
    all quantized by plain per-tensor LSQ quantizers."""
    points = (attn.q_quant, attn.k_quant, attn.v_quant, attn.attn_quant)
    return (not attn.training and not torch.is_grad_enabled()
            and all(type(p) is LSQQuantizer and plain(p, False) for p in points))


class Codes(nn.Module):
    """Levels of one per-tensor activation quantizer (float integers in [qmin, qmax]), with scale and offset.

    Built from None it passes x through with scale 1 and offset 0.
    """

    def __init__(self, q: LSQQuantizer | None, device=None):
        super().__init__()
        self.quantized = q is not None
        self.qmin, self.qmax = (float(q.qmin), float(q.qmax)) if q is not None else (0.0, 0.0)
        self.binary = q is not None and q.binary
        self.amax = max(abs(self.qmin), abs(self.qmax))
        self.has_offset = q is not None and q.offset is not None
        self.register_buffer("scale", step_of(q).reshape(-1) if q is not None else torch.ones(1, device=device))
        offset = q.offset.detach().float().reshape(-1) if self.has_offset else torch.zeros(1, device=device)
        self.register_buffer("offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return x
        v = (x - self.offset).div_(self.scale) if self.has_offset else x / self.scale
        if self.binary:
            return v.ge(0).float() * 2 - 1
        return v.clamp_(self.qmin, self.qmax).round_()  # in place on the fresh v: one activation-sized tensor


def weight_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """(codes, scale, offset or None, max |code|) of a layer's weight; float weight with scale 1 if not quantized."""
    q = live(layer.weight_quantizer)
    weight = layer.weight.detach().float()
    if q is None:
        return weight, torch.ones(1, device=weight.device), None, 0.0
    levels = q.levels(weight)
    codes = levels.to(torch.uint8 if q.qmin >= 0 else torch.int8)
    offset = None if q.offset is None else q.offset.detach().float()
    return codes, step_of(q).expand(len(weight), *step_of(q).shape[1:]), offset, float(max(-q.qmin, q.qmax))


class IntLayer(nn.Module):
    """Shared state of IntLinear / IntConv2d: activation Codes, weight codes, scales, offsets, bias."""

    def __init__(self, layer: nn.Module, view: tuple[int, ...]):
        super().__init__()
        device = layer.weight.device
        self.act = Codes(live(layer.act_quantizer), device)
        codes, scale, offset, self.w_amax = weight_codes(layer)
        self.register_buffer("weight", codes)
        self.register_buffer("w_scale", scale.reshape(view))
        self.has_w_offset = offset is not None
        self.register_buffer("w_offset", offset.reshape(view) if offset is not None else torch.zeros(1, device=device))
        bias = layer.bias.detach().float().clone() if layer.bias is not None else torch.zeros(len(codes), device=device)
        self.register_buffer("bias", bias.reshape(view))
        self.has_input_bias = layer.input_bias is not None
        input_bias = layer.input_bias.detach().float() if self.has_input_bias else torch.zeros(1, device=device)
        self.register_buffer("input_bias", input_bias)
        self.k = codes[0].numel()

    def rescale(self, acc: torch.Tensor, window_sum) -> torch.Tensor:
        """s_a * s_w * acc [+ s_a * o_w * sum of A over the window] + bias."""
        y = acc.float().mul_(self.act.scale * self.w_scale)  # acc is the op's fresh output: rescale in place
        if self.has_w_offset:
            y.add_(self.act.scale * self.w_offset * window_sum())
        return y.add_(self.bias)

    def codes_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        if self.has_input_bias:
            x = x + self.input_bias
        return self.act(x), acc_dtype(self.k, self.act.amax, self.w_amax)


class IntLinear(IntLayer):
    """QuantLinear as s_a * s_w * (A @ W^T) + bias (activation-offset term folded into the bias)."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer, (-1,))
        if self.act.has_offset:  # o_a * sum_k Q_w(W)_jk: a constant per output
            self.bias += self.act.offset * layer.weight_quantizer(layer.weight).detach().float().sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, dtype = self.codes_in(x)
        acc = F.linear(a.to(dtype), self.weight.to(dtype))
        return self.rescale(acc, lambda: a.sum(-1, keepdim=True)).to(x.dtype)


class IntConv2d(IntLayer):
    """QuantConv2d as s_a * s_w * conv(A, W) + bias; offset terms as convolutions of ones."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer, (-1, 1, 1))
        self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding, layer.dilation,
                                                                 layer.groups)
        kernel = layer.weight_quantizer(layer.weight).detach().float() * self.act.offset if self.act.has_offset \
            else torch.zeros(1, device=self.weight.device)
        self.register_buffer("offset_kernel", kernel)  # o_a * Q_w(W): the padded border sees 0, not o_a

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def window_sum(self, a: torch.Tensor) -> torch.Tensor:
        """Sum of A over each output's receptive field, per output channel."""
        c_out, c_in = self.weight.shape[:2]
        ones = torch.ones(self.groups, c_in, *self.weight.shape[2:], dtype=a.dtype, device=a.device)
        return self.conv(a, ones).repeat_interleave(c_out // self.groups, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, dtype = self.codes_in(x)
        y = self.rescale(self.conv(a.to(dtype), self.weight.to(dtype)), lambda: self.window_sum(a))
        if self.act.has_offset:
            y.add_(self.conv(torch.ones_like(x[:1]), self.offset_kernel))
        return y.to(x.dtype)


def attention_on_codes(q, k, v, codes: tuple[Codes, Codes, Codes, Codes], scale: float) -> torch.Tensor:
    """softmax(s_q * s_k * (Q * K^T) * scale) -> levels P, output s_p * s_v * (P * V); Q, K, V, P the codes of
    q, k, v and the probabilities: exact code products, one rescale each."""
    cq, ck, cv, cp = codes
    a, b = cq(q), ck(k)
    dtype = acc_dtype(q.shape[-1], cq.amax, ck.amax)
    scores = (a.to(dtype) @ b.to(dtype).transpose(-2, -1)).float().mul_(cq.scale * ck.scale * scale)
    p, c = cp(scores.softmax(dim=-1)), cv(v)
    dtype = acc_dtype(q.shape[-2], cp.amax, cv.amax)
    return (p.to(dtype) @ c.to(dtype)).float().mul_(cp.scale * cv.scale)
