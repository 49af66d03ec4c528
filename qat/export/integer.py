"""Integer model: every quantized layer and attention in the integer form of `qat.quant.integer`.

Each QuantLinear/QuantConv2d becomes an IntLinear/IntConv2d (exact code products, one rescale plus bias),
attention keeps q, k, v and softmax levels (`attention_on_codes`); norms, embeddings, pooling and FP layers
stay float. The fake-quant model evaluates in the same form, so the two compute the same numbers.
"""
import copy

import torch
from torch import nn

from qat.models.layers import Attention
from qat.quant import LSQQuantizer, QuantConv2d, QuantLinear
from qat.quant.integer import Codes, IntConv2d, IntLinear, attention_on_codes, live

KNOWN = "QuantLinear, QuantConv2d and Attention (q/k/v/softmax quantizers)"


POINTS = ("q_quant", "k_quant", "v_quant", "attn_quant")


class IntAttention(nn.Module):
    """Attention on q, k, v and softmax levels: exact code products, one rescale each. `layer` converts qkv and
    proj, `codes` makes each point's codes (the ONNX export passes its Q/DQ forms of both)."""

    def __init__(self, attn: Attention, path: str, layer=None, codes=None):
        super().__init__()
        layer, codes = layer or convert_layer, codes or (lambda q: Codes(live(q)))
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.qkv, self.proj = layer(attn.qkv, f"{path}.qkv"), layer(attn.proj, f"{path}.proj")
        for name in POINTS:
            q = live(getattr(attn, name))
            if q is not None and q.offset is not None:
                raise ValueError(f"{path}.{name}: attention quantizers with an offset cannot be exported as integers")
        self.codes = nn.ModuleList(codes(getattr(attn, n)) for n in POINTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention_on_codes(q, k, v, tuple(self.codes), self.scale)
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
        check_conv(mod, path)
        return IntConv2d(mod)
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
