"""Stop a run on NaN/Inf and say where it came from."""
import torch
from torch import nn

from qat.quant import quantizers


class NonFiniteError(RuntimeError):
    """Loss, teacher output or a quantizer parameter became NaN/Inf."""


def find_non_finite(model: nn.Module, x: torch.Tensor) -> str | None:
    """Name of the first module (in execution order) whose output holds NaN/Inf for input `x`."""
    found: list[str] = []

    def hook(name):
        def check(module, args, out):
            if not found and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                found.append(f"{name} ({type(module).__name__})")
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def non_finite_report(model: nn.Module, x: torch.Tensor) -> str:
    """Quantizers of `model` with a non-finite step/offset and the first layer with non-finite output on `x`."""
    bad = [n for n, q in quantizers(model) if not q.has_finite_params()]
    first = find_non_finite(model, x)
    return (f"quantizers with non-finite step/offset: {bad or 'none'}; first layer with non-finite output: "
            f"{first or 'none (check the loss inputs)'}")
