"""Empirical bias correction: fold the mean per-output-channel error of every quantized layer into its bias.

Layers are corrected in model order, each against the FP model's output on the same calibration batches
and with the corrections of the layers before it in place, so after the pass the mean output of every
quantized layer equals the FP mean per channel (on the calibration data). The forward of a layer's pass stops
at that layer (the rest of the model cannot change its output), about half the cost of whole passes.

With `variance=True` the std per channel is matched too: y -> r * (y - mean_q) + mean_fp, r = std_fp / std_q,
folded into the weight and its per-channel step (the integer levels stay) and the bias. Low-bit weights shrink a
layer's output (resnet20 W2: std 0.5-0.8 of FP), and restoring only the mean then moves every ReLU's cut
(bench/PTQ.md).
"""
from functools import partial

import torch
from torch import nn

from qat.ptq.calibrate import inputs_of
from qat.quant import LSQQuantizer, QuantConv2d, QuantLayerMixin, quantizers_off
from qat.quant.integer import live


def channel_moments(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """(mean, mean square) over every dim but the output channel (dim 1 of a conv output, the last dim of a
    linear one): shape (2, channels), float64."""
    y = y.detach().double()
    y = y.movedim(1, -1).reshape(-1, y.shape[1]) if isinstance(layer, QuantConv2d) else y.reshape(-1, y.shape[-1])
    return torch.stack([y.mean(0), y.square().mean(0)])


class _Reached(Exception):
    """Raised by the hook of the layer a pass is for: the rest of the forward is not needed."""


@torch.no_grad()
def output_moments(model: nn.Module, layers: dict[str, nn.Module], batches: list, stop_at: str | None = None,
                   calls: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """{name: (mean, mean square) of the output per channel over `batches`} for `layers`, in the model's current
    mode (shape (2, channels), `channel_moments`); with `stop_at`
    (a layer called once per forward) each forward ends right after that layer; `calls`, if given, gets how
    often each layer ran per forward."""
    sums, counts = {name: 0.0 for name in layers}, dict.fromkeys(layers, 0)

    def record(module, args, y, name):
        sums[name] = sums[name] + channel_moments(y, module)
        counts[name] += 1
        if name == stop_at:
            raise _Reached

    hooks = [layer.register_forward_hook(partial(record, name=name)) for name, layer in layers.items()]
    try:
        for batch in batches:
            try:
                model(inputs_of(batch))
            except _Reached:
                pass
    finally:
        for h in hooks:
            h.remove()
    if calls is not None:
        calls.update({name: n // len(batches) for name, n in counts.items()})
    return {name: s / len(batches) for name, s in sums.items()}


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: quantized layer} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


def std(moments: torch.Tensor) -> torch.Tensor:
    return (moments[1] - moments[0].square()).clamp_min(0).sqrt()


def per_channel_steps(layer: nn.Module) -> bool:
    """Whether an output-channel scale folds into the layer exactly: a float weight or per-channel steps."""
    q = live(layer.weight_quantizer)
    return q is None or (type(q) is LSQQuantizer and q.per_channel)


def scale_channels_(layer: nn.Module, r: torch.Tensor) -> None:
    """Multiply the layer's output channels by r: the weight and its per-channel step (and offset) by r, so
    W / step and the integer levels stay. The bias is the caller's."""
    layer.weight.mul_(r.view(-1, *[1] * (layer.weight.ndim - 1)).to(layer.weight.dtype))
    q = live(layer.weight_quantizer)
    if q is not None:
        for t in (q.step, q.offset):
            if t is not None:
                t.mul_(r.view(t.shape).to(t.dtype))


@torch.no_grad()
def bias_correct_(model: nn.Module, batches: list, variance: bool = False) -> dict[str, float]:
    """Correct every quantized layer's bias (and, with `variance`, its output scale) in place; returns
    {layer: max |mean correction|}.

    Every quantized layer needs a bias (quantize_ with QuantConfig(add_bias=True) gives one to those without);
    `variance` needs per-channel weight steps. A channel whose quantized output is constant (std under 1e-6 of
    the FP one: every weight rounded to zero) keeps its scale.
    """
    layers = quant_layers(model)
    missing = [n for n, m in layers.items() if m.bias is None]
    if missing:
        raise ValueError(f"bias correction needs a bias on every quantized layer; {missing[:4]} have none: "
                         "quantize with QuantConfig(add_bias=True)")
    per_tensor = [n for n, m in layers.items() if not per_channel_steps(m)]
    if variance and per_tensor:
        raise ValueError(f"bias_correct=variance scales each output channel: {per_tensor[:4]} have per-tensor weight "
                         "steps; quantize weights per channel (ptq.granularity=channel) or use bias_correct=empirical")
    was_training = model.training
    model.eval()
    calls = {}
    with quantizers_off(model):
        fp = output_moments(model, layers, batches, calls=calls)
    once = {name for name, n in calls.items() if n == 1}
    report = {}
    for name, layer in layers.items():
        q = output_moments(model, {name: layer}, batches, stop_at=name if name in once else None)[name]
        error = q[0] - fp[name][0]
        if variance:  # b -> r * b + mean_fp - r * mean_q
            s_q, s_fp = std(q), std(fp[name])
            r = torch.where(s_q > 1e-6 * s_fp, s_fp / s_q, torch.ones_like(s_q))
            scale_channels_(layer, r)
            layer.bias.copy_((r * layer.bias.double() + fp[name][0] - r * q[0]).to(layer.bias.dtype))
        else:
            layer.bias.sub_(error.to(layer.bias.dtype))
        report[name] = float(error.abs().max())
    model.train(was_training)
    return report
