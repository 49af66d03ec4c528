"""Integer model: every quantized layer as an exact matmul/conv on integer codes, then one rescale plus bias.

    y = s_a * s_w * (A * W)  [+ s_a * o_w * (A * 1)]  [+ o_a * (1 * Q_w(W))]  + bias

A = activation levels (`LSQQuantizer.levels`), W = weight levels (int8/uint8 storage), `*` the layer's
matmul/conv; the bracketed LSQ+ offset terms appear only where the quantizer has an offset (for Linear the
activation-offset term is a constant folded into the bias). The codes are small integers held in float
tensors: a sum of integers is exact in float32 while every partial sum stays below 2**24, so a product
accumulates in float32 when K * max|A| * max|W| <= 2**24 and in float64 (exact to 2**53) otherwise.
A side that is not quantized (a float activation or weight) enters with scale 1 and is not exact.
Norms, embeddings, pooling and FP layers stay float. Attention keeps q, k, v and softmax levels:
softmax(s_q * s_k * (Q * K^T) / sqrt(d)) -> levels P, output s_p * s_v * (P * V).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from qat.models.layers import Attention
from qat.quant import LSQQuantizer, QuantConv2d, QuantLinear

EXACT_FLOAT32 = 2.0 ** 24
KNOWN = "QuantLinear, QuantConv2d and Attention (q/k/v/softmax quantizers)"


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


class Codes(nn.Module):
    """Levels of one per-tensor activation quantizer (float integers in [qmin, qmax]), with scale and offset.

    Built from None it passes x through with scale 1 and offset 0.
    """

    def __init__(self, q: LSQQuantizer | None):
        super().__init__()
        self.quantized = q is not None
        self.qmin, self.qmax = (float(q.qmin), float(q.qmax)) if q is not None else (0.0, 0.0)
        self.binary = q is not None and q.binary
        self.amax = max(abs(self.qmin), abs(self.qmax))
        self.has_offset = q is not None and q.offset is not None
        self.register_buffer("scale", step_of(q).reshape(-1) if q is not None else torch.ones(1))
        offset = q.offset.detach().float().reshape(-1) if self.has_offset else torch.zeros(1)
        self.register_buffer("offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return x
        v = (x - self.offset) / self.scale if self.has_offset else x / self.scale
        if self.binary:
            return v.ge(0).float() * 2 - 1
        return v.clamp(self.qmin, self.qmax).round()


def weight_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """(codes, scale, offset or None, max |code|) of a layer's weight; float weight with scale 1 if not quantized."""
    q = live(layer.weight_quantizer)
    weight = layer.weight.detach().float()
    if q is None:
        return weight, torch.ones(1), None, 0.0
    levels = q.levels(weight)
    codes = levels.to(torch.uint8 if q.qmin >= 0 else torch.int8)
    offset = None if q.offset is None else q.offset.detach().float()
    return codes, step_of(q).expand(len(weight), *step_of(q).shape[1:]), offset, float(max(-q.qmin, q.qmax))


class IntLayer(nn.Module):
    """Shared state of IntLinear / IntConv2d: activation Codes, weight codes, scales, offsets, bias."""

    def __init__(self, layer: nn.Module, view: tuple[int, ...]):
        super().__init__()
        self.act = Codes(live(layer.act_quantizer))
        codes, scale, offset, self.w_amax = weight_codes(layer)
        self.register_buffer("weight", codes)
        self.register_buffer("w_scale", scale.reshape(view))
        self.has_w_offset = offset is not None
        self.register_buffer("w_offset", offset.reshape(view) if offset is not None else torch.zeros(1))
        bias = layer.bias.detach().float().clone() if layer.bias is not None else torch.zeros(len(codes))
        self.register_buffer("bias", bias.reshape(view))
        self.has_input_bias = layer.input_bias is not None
        input_bias = layer.input_bias.detach().float() if self.has_input_bias else torch.zeros(1)
        self.register_buffer("input_bias", input_bias)
        self.k = codes[0].numel()

    def rescale(self, acc: torch.Tensor, window_sum) -> torch.Tensor:
        """s_a * s_w * acc [+ s_a * o_w * sum of A over the window] + bias."""
        y = acc.float() * (self.act.scale * self.w_scale)
        if self.has_w_offset:
            y = y + self.act.scale * self.w_offset * window_sum()
        return y + self.bias

    def codes_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        if self.has_input_bias:
            x = x + self.input_bias
        return self.act(x), acc_dtype(self.k, self.act.amax, self.w_amax)


class IntLinear(IntLayer):
    """QuantLinear as s_a * s_w * (A @ W^T) + bias (activation-offset term folded into the bias)."""

    def __init__(self, layer: QuantLinear):
        super().__init__(layer, (-1,))
        if self.act.has_offset:  # o_a * sum_k Q_w(W)_jk: a constant per output
            self.bias += self.act.offset * layer.weight_quantizer(layer.weight).detach().float().sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, dtype = self.codes_in(x)
        acc = F.linear(a.to(dtype), self.weight.to(dtype))
        return self.rescale(acc, lambda: a.sum(-1, keepdim=True))


class IntConv2d(IntLayer):
    """QuantConv2d as s_a * s_w * conv(A, W) + bias; offset terms as convolutions of ones."""

    def __init__(self, layer: QuantConv2d, path: str):
        check_conv(layer, path)
        super().__init__(layer, (-1, 1, 1))
        self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding, layer.dilation,
                                                                 layer.groups)
        kernel = layer.weight_quantizer(layer.weight).detach().float() * self.act.offset if self.act.has_offset \
            else torch.zeros(1)
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
            y = y + self.conv(torch.ones_like(x[:1]), self.offset_kernel)
        return y


class IntAttention(nn.Module):
    """Attention on q, k, v and softmax levels: exact code products, one rescale each."""

    def __init__(self, attn: Attention, path: str):
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.qkv, self.proj = convert_layer(attn.qkv, f"{path}.qkv"), convert_layer(attn.proj, f"{path}.proj")
        for name in ("q_quant", "k_quant", "v_quant", "attn_quant"):
            q = live(getattr(attn, name))
            if q is not None and q.offset is not None:
                raise ValueError(f"{path}.{name}: attention quantizers with an offset cannot be exported as integers")
        self.q, self.k = Codes(live(attn.q_quant)), Codes(live(attn.k_quant))
        self.v, self.p = Codes(live(attn.v_quant)), Codes(live(attn.attn_quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        a, b = self.q(q), self.k(k)
        dtype = acc_dtype(C // self.num_heads, self.q.amax, self.k.amax)
        scores = (a.to(dtype) @ b.to(dtype).transpose(-2, -1)).float() * (self.q.scale * self.k.scale * self.scale)
        p, c = self.p(scores.softmax(dim=-1)), self.v(v)
        dtype = acc_dtype(N, self.p.amax, self.v.amax)
        out = (p.to(dtype) @ c.to(dtype)).float() * (self.p.scale * self.v.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def check_conv(layer: QuantConv2d, path: str) -> None:
    if layer.padding_mode != "zeros":
        raise ValueError(f"{path}: QuantConv2d with padding_mode={layer.padding_mode!r} cannot be exported; "
                         "only padding_mode='zeros' is supported")


def convert_layer(mod: nn.Module, path: str) -> nn.Module:
    """QuantLinear/QuantConv2d -> IntLinear/IntConv2d; a float layer is kept as it is."""
    if isinstance(mod, QuantLinear):
        return IntLinear(mod)
    if isinstance(mod, QuantConv2d):
        return IntConv2d(mod, path)
    if any(isinstance(m, LSQQuantizer) for m in mod.modules()):
        raise unknown_layer(mod, path)
    return mod


def unknown_layer(mod: nn.Module, path: str) -> ValueError:
    return ValueError(f"layer {path or '<root>'} ({type(mod).__name__}) holds quantizers but the exporter knows only "
                      f"{KNOWN}; convert it to one of those or exclude it from quant.modules")


def _convert_tree(mod: nn.Module, path: str) -> nn.Module:
    """`mod` with its quantized layers and attention converted (the converted module itself if it is one)."""
    points = [getattr(mod, n, None) for n in ("q_quant", "k_quant", "v_quant", "attn_quant")]
    if isinstance(mod, Attention) and any(isinstance(p, LSQQuantizer) for p in points):
        return IntAttention(mod, path)
    if isinstance(mod, (QuantLinear, QuantConv2d)):
        return convert_layer(mod, path)
    for name, child in list(mod.named_children()):
        if isinstance(child, LSQQuantizer):
            raise unknown_layer(mod, path)
        setattr(mod, name, _convert_tree(child, f"{path}.{name}" if path else name))
    return mod


@torch.no_grad()
def to_integer(model: nn.Module) -> nn.Module:
    """An eval-mode copy of the fake-quant `model` with every quantized layer and attention in integer form."""
    return _convert_tree(copy.deepcopy(model).eval(), "").eval()
