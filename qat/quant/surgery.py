"""`quantize_`: swap a model's layers and attention QuantPoints for quantized ones, in place."""
import difflib
import logging
from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase

from torch import nn

from qat.models.quant_point import QuantPoint
from qat.quant.config import QuantConfig
from qat.quant.layers import QuantConv2d, QuantLinear
from qat.quant.quantizers import LSQQuantizer, quantizers

log = logging.getLogger(__name__)

ATTN_KINDS = ("q", "k", "v", "attn_probs")
SHOWN = 6  # module names listed in an error


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _check_patterns(patterns: list[str], names: list[str], where: str) -> None:
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=SHOWN, cutoff=0.3) or names[:SHOWN]
            raise ValueError(f"{where}: pattern {pattern!r} matches no Linear/Conv2d module; "
                             f"module names look like {close}")


def _act_signed(model: nn.Module, config: QuantConfig, name: str) -> bool:
    """Explicit quant.act.signed, else quant.signed patterns, else unsigned where the input is known >= 0."""
    if config.act.signed is not None:
        return config.act.signed
    if _matches(name, config.signed):
        return True
    return not (_matches(name, getattr(model, "non_negative_inputs", [])) or _matches(name, config.unsigned))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def quantize_(model: nn.Module, config: QuantConfig | Mapping,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Quantize `model` in place (reference §3) and return it.

    Layers: the nn.Linear/nn.Conv2d modules matching `config.modules` (default: the model's
    `default_quant_modules`, or every Linear/Conv2d when it has none), minus `config.exclude` and
    those for which `filter_fn(module, name)` is False, become QuantLinear/QuantConv2d with the weight
    and/or input-activation quantizers of the config. With `config.attn`, every attention QuantPoint
    (kinds q, k, v: signed; attn_probs: unsigned unless probs_signed) becomes an LSQQuantizer.
    """
    if isinstance(config, Mapping):
        config = QuantConfig(**config)
    if any(True for _ in quantizers(model)):
        raise ValueError(f"{type(model).__name__} is already quantized: call quantize_ on a fresh model")
    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))}
    names = list(layers)
    device = next((p.device for p in model.parameters()), "cpu")
    quantized = []
    if config.weight is not None or config.act is not None:
        patterns, where = config.modules, "quant.modules"
        if patterns is None:
            patterns = getattr(model, "default_quant_modules", None) or ["*"]
            where = f"{type(model).__name__}.default_quant_modules"
        _check_patterns(patterns, names, where)
        for key in ("exclude", "unsigned", "signed"):
            _check_patterns(getattr(config, key), names, f"quant.{key}")
        for name, mod in layers.items():
            if (not _matches(name, patterns) or _matches(name, config.exclude)
                    or (filter_fn is not None and not filter_fn(mod, name))):
                continue
            cls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
            if config.add_bias and mod.bias is None:
                mod.bias = nn.Parameter(mod.weight.new_zeros(mod.weight.shape[0]))
            signed = _act_signed(model, config, name) if config.act is not None else True
            _replace(model, name, cls.from_float(mod, config.weight, config.act, signed, config.learnable_bias))
            quantized.append(name)
    points = []
    if config.attn is not None:
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantPoint) and m.kind in ATTN_KINDS]
        if not found:
            raise ValueError(f"quant.attn is set but model {type(model).__name__} has no attention quantization "
                             f"points (QuantPoint of kind {list(ATTN_KINDS)}); set quant.attn=null")
        for name, point in found:
            if _matches(name, config.exclude) or (filter_fn is not None and not filter_fn(point, name)):
                continue
            signed = point.kind != "attn_probs" or config.attn.probs_signed
            _replace(model, name, LSQQuantizer(config.attn.bits, signed=signed,
                                               symmetric=config.attn.symmetric).to(device))
            points.append(name)
    for name, q in quantizers(model):
        q.name = name
    log.info("quantize_: %d layers quantized (weight %s, act %s), %d attention points (%s)", len(quantized),
             _describe(config.weight), _describe(config.act), len(points), _describe(config.attn))
    return model


def _describe(cfg) -> str:
    return "fp" if cfg is None else f"{cfg.bits}b"
