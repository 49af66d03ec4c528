"""A text table of what quantization did to a model: every quantized layer and the float layers left out."""
from torch import nn

from qat.models.quant_point import QuantPoint
from qat.quant import LSQQuantizer, QuantLayerMixin

FLOAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def describe(q: nn.Module) -> dict:
    """Bits, signedness, per-channel and initial step of one quantizer ('fp' fields for an nn.Identity)."""
    if not isinstance(q, LSQQuantizer):
        return {"bits": "fp", "sign": "-", "per_channel": "-", "step": "-"}
    step = q.step.detach().float()
    if not q.is_initialized:
        shown = "uninit"
    elif step.numel() > 1:
        shown = f"{step.mean().item():.4g} ({step.min().item():.3g}..{step.max().item():.3g})"
    else:
        shown = f"{step.item():.4g}"
    return {"bits": f"{q.bits}b [{q.qmin},{q.qmax}]", "sign": "signed" if q.signed else "unsigned",
            "per_channel": f"yes ({q.step.shape[0]})" if q.per_channel else "no", "step": shown}


def quant_rows(model: nn.Module) -> tuple[list[list[str]], list[str]]:
    """(rows of the quantized layers and quantization points, the float layers and points left out)."""
    rows, left_out = [], []
    for name, module in model.named_modules():
        if isinstance(module, QuantLayerMixin):
            w, a = describe(module.weight_quantizer), describe(module.act_quantizer)
            rows.append([name, type(module).__name__, w["bits"], a["bits"], a["sign"], w["per_channel"],
                         w["step"], a["step"]])
        elif isinstance(module, LSQQuantizer) and not name.endswith(("weight_quantizer", "act_quantizer")):
            q = describe(module)
            rows.append([name, "point", "-", q["bits"], q["sign"], "-", "-", q["step"]])
        elif isinstance(module, QuantPoint):
            left_out.append(f"{name} (point {module.kind})")
        elif isinstance(module, FLOAT_LAYERS):
            left_out.append(f"{name} ({type(module).__name__})")
    return rows, left_out


def quant_summary(model: nn.Module) -> str:
    """Every quantized layer (weight bits, act bits, act signedness, weight per-channel, initial weight/act
    step; 'uninit' before calibration), every quantized attention point, and the float Linear/Conv layers
    and points left out, as aligned text."""
    rows, left_out = quant_rows(model)
    header = ["layer", "type", "weight", "act", "act sign", "w per-channel", "w step", "act step"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    text = [f"quantized: {len(rows)} layer(s) / point(s)", line(header), line(["-" * w for w in widths])]
    text += [line(r) for r in rows]
    text.append(f"left in full precision: {len(left_out)}" + (": " + ", ".join(left_out) if left_out else ""))
    return "\n".join(text)
