"""Empirical bias correction: fold the mean per-output-channel error of every quantized layer into its bias.

Layers are corrected in model order, each against the FP model's output on the same calibration batches
and with the corrections of the layers before it in place, so after the pass the mean output of every
quantized layer equals the FP mean per channel (on the calibration data). The forward of a layer's pass stops
at that layer (the rest of the model cannot change its output), about half the cost of whole passes.
"""
from functools import partial

import torch
from torch import nn

from qat.ptq.calibrate import inputs_of
from qat.quant import QuantConv2d, QuantLayerMixin, quantizers_off


def channel_mean(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Mean over every dim but the output channel: dim 1 of a conv output, the last dim of a linear one."""
    y = y.detach().double()
    return y.movedim(1, -1).reshape(-1, y.shape[1]).mean(0) if isinstance(layer, QuantConv2d) \
        else y.reshape(-1, y.shape[-1]).mean(0)


class _Reached(Exception):
    """Raised by the hook of the layer a pass is for: the rest of the forward is not needed."""


@torch.no_grad()
def output_means(model: nn.Module, layers: dict[str, nn.Module], batches: list, stop_at: str | None = None,
                 calls: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """{name: mean output per channel over `batches`} for `layers`, in the model's current mode; with `stop_at`
    (a layer called once per forward) each forward ends right after that layer; `calls`, if given, gets how
    often each layer ran per forward."""
    sums, counts = {name: 0.0 for name in layers}, dict.fromkeys(layers, 0)

    def record(module, args, y, name):
        sums[name] = sums[name] + channel_mean(y, module)
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


@torch.no_grad()
def bias_correct_(model: nn.Module, batches: list) -> dict[str, float]:
    """Correct every quantized layer's bias in place; returns {layer: max |correction|}.

    Every quantized layer needs a bias (quantize_ with QuantConfig(add_bias=True) gives one to those without).
    """
    layers = quant_layers(model)
    missing = [n for n, m in layers.items() if m.bias is None]
    if missing:
        raise ValueError(f"bias correction needs a bias on every quantized layer; {missing[:4]} have none: "
                         "quantize with QuantConfig(add_bias=True)")
    was_training = model.training
    model.eval()
    calls = {}
    with quantizers_off(model):
        fp = output_means(model, layers, batches, calls=calls)
    once = {name for name, n in calls.items() if n == 1}
    report = {}
    for name, layer in layers.items():
        error = output_means(model, {name: layer}, batches, stop_at=name if name in once else None)[name] - fp[name]
        layer.bias.sub_(error.to(layer.bias.dtype))
        report[name] = float(error.abs().max())
    model.train(was_training)
    return report
