"""AWQ: per-input-channel scales that protect salient weight columns, folded so the FP function is unchanged.

For a layer y = W x whose input comes from a foldable op P (x = P(.) or relu(P(.))), the weight becomes
W diag(s) and P's output channels are divided by s. s = mean|x|^alpha (normalised), alpha searched on a
grid to minimise |layer(x / s, Q(W diag(s))) - layer(x, W)|^2 on calibration inputs (Lin et al. 2023).
"""
import torch
import torch.nn.functional as F
from torch import nn

from qat.ptq.calibrate import inputs_of, rows_of
from qat.ptq.observers import Observer, Stats, fake_quant
from qat.quant import LSQQuantizer, QuantConv2d, QuantLayerMixin, quantizers_off


def _is_relu_block(parent: nn.Module) -> bool:
    return isinstance(getattr(parent, "activation", None), nn.ReLU)


# (previous op, layer, rows of the previous op's output that feed the layer, condition on the parent),
# names relative to their common parent: CIFAR ResNet BasicBlock, transformer encoder block
FOLDS = [
    ("bn1", "conv2", None, None),                       # conv2(relu(bn1(.))): relu commutes with s > 0
    ("pre_norm", "self_attn.qkv", None, None),          # pre_norm's output feeds only the attention
    ("self_attn.qkv", "self_attn.proj", "v", None),     # proj(softmax(qk) @ v) is linear in v
    ("linear1", "linear2", None, _is_relu_block),       # linear2(relu(linear1(.)))
]


def fold_pairs(model: nn.Module) -> dict[str, tuple[nn.Module, slice | None]]:
    """{quantized layer name: (previous op, its output rows feeding the layer)} for the foldable layers."""
    modules = dict(model.named_modules())
    pairs = {}
    for name, layer in modules.items():
        if not isinstance(layer, QuantLayerMixin) or not isinstance(layer.weight_quantizer, LSQQuantizer):
            continue
        for prev, rel, rows, condition in FOLDS:
            parent = name[:-len(rel)].rstrip(".") if name.endswith(rel) else None
            if parent is None or f"{parent}.{prev}".lstrip(".") not in modules:
                continue
            op = modules[f"{parent}.{prev}".lstrip(".")]
            if getattr(op, "weight", None) is None or (condition and not condition(modules[parent])):
                continue
            width = layer.weight.shape[1]
            pairs[name] = (op, slice(2 * width, 3 * width) if rows == "v" else None)
    return pairs


def _forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, QuantConv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


def _in_shape(layer: nn.Module) -> tuple:
    """Shape of s broadcasting over the input channels of the layer's input and weight (both dim 1 / last)."""
    return (1, -1, 1, 1) if isinstance(layer, QuantConv2d) else (1, -1)


@torch.no_grad()
def search_scales(layer: nn.Module, x: torch.Tensor, observer: Observer, grid: int = 20) -> tuple[torch.Tensor, float]:
    """(s, alpha): the per-input-channel scales with the smallest output error of the quantized weight."""
    q = layer.weight_quantizer
    x_cols = x.movedim(1, -1) if isinstance(layer, QuantConv2d) else x
    magnitude = x_cols.abs().reshape(-1, x_cols.shape[-1]).mean(0).clamp_min(1e-8)
    target = _forward(layer, x, layer.weight)
    best = (float("inf"), None, 0.0)
    for alpha in torch.arange(grid + 1).tolist():
        alpha = alpha / grid
        s = magnitude.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        w = layer.weight * s.view(_in_shape(layer))
        step, offset = observer(Stats.of(rows_of(w, q)), q.qmin, q.qmax, q.offset is not None)
        step = step.clamp_min(q.eps).view_as(q.step)
        w_q = fake_quant(w, step, None if offset is None else offset.view_as(q.step), q.qmin, q.qmax)
        error = float((_forward(layer, x / s.view(_in_shape(layer)), w_q) - target).square().mean())
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def fold_(layer: nn.Module, op: nn.Module, rows: slice | None, s: torch.Tensor) -> None:
    """W <- W diag(s); the previous op's output channels (rows) <- / s. Function preserving."""
    layer.weight.mul_(s.view(_in_shape(layer)))
    rows = rows or slice(None)
    shape = (-1,) + (1,) * (op.weight.ndim - 1)
    op.weight[rows] /= s.view(shape)
    if getattr(op, "bias", None) is not None:
        op.bias[rows] /= s


def awq_(model: nn.Module, batches: list, observer: Observer, grid: int = 20) -> dict[str, float]:
    """Scale every foldable quantized layer in place (before calibration); returns {layer: chosen alpha}."""
    pairs = fold_pairs(model)
    modules = dict(model.named_modules())
    inputs = {}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach()))
             for n in pairs]
    try:
        with quantizers_off(model):
            model(inputs_of(batches[0]))
    finally:
        for h in hooks:
            h.remove()
    report = {}
    with quantizers_off(model):
        for name, (op, rows) in pairs.items():
            layer = modules[name]
            s, report[name] = search_scales(layer, inputs[name], observer, grid)
            fold_(layer, op, rows, s)
    return report
