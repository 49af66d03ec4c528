"""`quantize_`: swap a model's layers and attention QuantPoints for quantized ones, in place."""
import dataclasses
import difflib
import logging
from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase

from torch import nn

from qat.models.quant_point import QuantPoint
from qat.quant.config import QuantConfig
from qat.quant.groups import GroupQuantizer, post_norm_linears
from qat.quant.layers import QuantConv2d, QuantLinear
from qat.quant.quantizers import LSQQuantizer, quantizers

log = logging.getLogger(__name__)

ATTN_KINDS = ("q", "k", "v", "attn_probs")
SHOWN = 6  # module names listed in an error


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _check_patterns(patterns: list[str], names: list[str], where: str, what: str = "Linear/Conv2d module") -> None:
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=SHOWN, cutoff=0.3) or names[:SHOWN]
            raise ValueError(f"{where}: pattern {pattern!r} matches no {what}; module names look like {close}")


def _signed(config: QuantConfig, name: str, group_signed: bool | None, non_negative: bool) -> bool:
    """The signedness rule for any activation quantizer (QuantConfig): the last matching override, else the
    config group's `signed` (quant.act / quant.attn), else unsigned exactly where the input is known >= 0."""
    matched = [signed for pattern, signed in config.signed_overrides.items() if fnmatchcase(name, pattern)]
    if matched:
        return matched[-1]
    return group_signed if group_signed is not None else not non_negative


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
    (kinds q, k, v, attn_probs) becomes an LSQQuantizer. With `config.head_stem_bits`, the Linear/Conv2d layers
    before the first and after the last selected one (module order: stem and head, `head_stem`) are quantized
    too, at that many bits. Signedness follows the QuantConfig rule (`_signed`).
    With `config.attn_default_init`, the attention Linear layers are re-initialised first (PyTorch's default).
    """
    if isinstance(config, Mapping):
        config = QuantConfig(**config)
    if any(True for _ in quantizers(model)):
        raise ValueError(f"{type(model).__name__} is already quantized: call quantize_ on a fresh model")
    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))}
    points = {n: m for n, m in model.named_modules() if isinstance(m, QuantPoint) and m.kind in ATTN_KINDS}
    _check_patterns(list(config.signed_overrides), list(layers) + list(points), "quant.signed_overrides",
                    "Linear/Conv2d module or attention QuantPoint")
    if config.attn_default_init:
        _reset_attention_linears(model, points)
    quantized = _quantize_layers(model, config, layers, filter_fn)
    replaced = _quantize_points(model, config, points, filter_fn)
    for name, q in quantizers(model):
        q.name = name
    log.info("quantize_: %d layers quantized (weight %s, act %s), %d attention points (%s)", len(quantized),
             _describe(config.weight), _describe(config.act), len(replaced), _describe(config.attn))
    return model


def _reset_attention_linears(model: nn.Module, points: dict[str, QuantPoint]) -> None:
    """nn.Linear.reset_parameters() (kaiming-uniform a=sqrt(5), uniform bias) on the Linear children of every
    module holding attention QuantPoints, in module order."""
    owners = dict.fromkeys(name.rpartition(".")[0] for name in points)
    if not owners:
        raise ValueError(f"quant.attn_default_init=true but model {type(model).__name__} has no attention "
                         "quantization points; set quant.attn_default_init=false")
    reset = [child for owner in owners for child in model.get_submodule(owner).children() if type(child) is nn.Linear]
    for layer in reset:
        layer.reset_parameters()
    log.info("quantize_: %d attention Linear layers reset to PyTorch's default init", len(reset))


def _quantize_layers(model: nn.Module, config: QuantConfig, layers: dict[str, nn.Module],
                     filter_fn: Callable | None) -> list[str]:
    """Swap the selected Linear/Conv2d layers (and the stem / head with head_stem_bits) for QuantLinear /
    QuantConv2d; returns their names."""
    if config.weight is None and config.act is None:
        return []
    patterns, where = config.modules, "quant.modules"
    if patterns is None:
        patterns = getattr(model, "default_quant_modules", None) or ["*"]
        where = f"{type(model).__name__}.default_quant_modules"
    _check_patterns(patterns, list(layers), where)
    _check_patterns(config.exclude, list(layers), "quant.exclude")
    bits = {name: None for name in layers if _matches(name, patterns)}
    bits.update(dict.fromkeys(head_stem(list(layers), list(bits)), config.head_stem_bits)
                if config.head_stem_bits is not None else {})
    grouped = _grouped(model, config, [n for n in bits if bits[n] is None])
    quantized = []
    for name, mod in layers.items():
        if (name not in bits or _matches(name, config.exclude)
                or (filter_fn is not None and not filter_fn(mod, name))):
            continue
        if config.add_bias and mod.bias is None:  # PTQ bias correction folds into it; the recipe rebuilds it
            mod.bias = nn.Parameter(mod.weight.new_zeros(mod.weight.shape[0]))
        _replace(model, name, _quant_layer(model, config, name, mod, bits[name], name in grouped))
        quantized.append(name)
    return quantized


def _quant_layer(model: nn.Module, config: QuantConfig, name: str, mod: nn.Module, bits: int | None,
                 grouped: bool) -> nn.Module:
    """The QuantLinear / QuantConv2d of `mod` (at `bits`, None: the config's), with a GroupQuantizer input
    when `grouped`."""
    cls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
    weight, act = (_at_bits(c, bits) for c in (config.weight, config.act))
    signed = act is None or _signed(config, name, act.signed, _matches(name, getattr(model, "non_negative_inputs", [])))
    new = cls.from_float(mod, weight, act, signed, config.learnable_bias)
    if grouped:
        new.act_quantizer = GroupQuantizer.from_config(act, signed, mod.in_features, config.n_groups,
                                                       config.dynamic_groups).to(mod.weight.device)
    return new


def _grouped(model: nn.Module, config: QuantConfig, selected: list[str]) -> set[str]:
    """The selected layers whose inputs get group quantizers (quant.n_groups): those after a LayerNorm."""
    if config.n_groups is None:
        return set()
    found = set(post_norm_linears(model)) & set(selected)
    if not found:
        raise ValueError(f"quant.n_groups={config.n_groups}: {type(model).__name__} has no selected Linear layer "
                         "that reads a LayerNorm output (qat.quant.groups.NORM_PAIRS); set quant.n_groups=null")
    return found


def head_stem(names: list[str], selected: list[str]) -> list[str]:
    """The layers of `names` (module order) before the first and after the last of `selected`: the stem
    (patch embedding, tokenizer convs, ResNet conv1) and the head (classifier)."""
    if not selected:
        return []
    first, last = names.index(selected[0]), names.index(selected[-1])
    return names[:first] + names[last + 1:]


def _at_bits(cfg, bits: int | None):
    """`cfg` with `bits` (None: unchanged)."""
    return cfg if cfg is None or bits is None else dataclasses.replace(cfg, bits=bits)


def _quantize_points(model: nn.Module, config: QuantConfig, points: dict[str, QuantPoint],
                     filter_fn: Callable | None) -> list[str]:
    """Swap the attention QuantPoints for LSQQuantizers (quant.attn); returns their names."""
    if config.attn is None:
        return []
    if not points:
        raise ValueError(f"quant.attn is set but model {type(model).__name__} has no attention quantization "
                         f"points (QuantPoint of kind {list(ATTN_KINDS)}); set quant.attn=null")
    device = next((p.device for p in model.parameters()), "cpu")
    replaced = []
    for name, point in points.items():
        if _matches(name, config.exclude) or (filter_fn is not None and not filter_fn(point, name)):
            continue
        signed = _signed(config, name, config.attn.signed, point.non_negative)
        _replace(model, name, _point_quantizer(model, config, name, point, signed).to(device))
        replaced.append(name)
    return replaced


def _point_quantizer(model: nn.Module, config: QuantConfig, name: str, point: QuantPoint, signed: bool) -> nn.Module:
    """The LSQQuantizer of an attention point; with quant.n_groups, the softmax output's is a GroupQuantizer over
    the heads (dim -3 of (B, h, N, N)) with min(n_groups, heads) groups."""
    attn = config.attn
    if config.n_groups is None or point.kind != "attn_probs":
        return LSQQuantizer(attn.bits, signed=signed, symmetric=attn.symmetric, eps=attn.eps)
    owner = model.get_submodule(name.rpartition(".")[0])
    heads = getattr(owner, "num_heads", None)
    if not isinstance(heads, int):
        raise ValueError(f"quant.n_groups with quant.attn groups the heads of {name}, but its attention module "
                         f"{type(owner).__name__} has no num_heads; set quant.n_groups=null or quant.attn=null")
    return GroupQuantizer.from_config(attn, signed, heads, min(config.n_groups, heads), config.dynamic_groups, -3)


def _describe(cfg) -> str:
    return "fp" if cfg is None else f"{cfg.bits}b"
