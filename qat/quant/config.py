"""Quantization settings as validated dataclasses (the `quant` config group builds QuantConfig)."""
import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field

from qat.quant.quantizers import INITS


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not supported: use an integer in 1..8")


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps={eps!r} is not supported: the step floor must be a number > 0, e.g. 1e-5")


@dataclass
class QuantizerConfig:
    """One LSQ quantizer.

    Example: QuantizerConfig(bits=4, per_channel=True) for 4-bit per-output-channel weights.
    """

    bits: int  # 1..8; 1-bit signed = sign(x) * step
    symmetric: bool = True  # False = 'asym': one extra level (e.g. [-2, 1] at 2 bits), no zero point
    signed: bool | None = None  # None = auto: unsigned where the layer input is known >= 0
    per_channel: bool = False  # weights: one step per output channel; layer inputs: one per input channel
    learnable_offset: bool = False  # LSQ+ learnable offset
    init: str = "lsq"  # 'lsq' 2*mean|x|/sqrt(Qp) | 'minmax' | 'mse'
    eps: float = 1e-5  # floor of the step (forward, calibration and clamp_steps_)

    def __post_init__(self):
        _check_bits(self.bits)
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is not supported; choose one of {list(INITS)}")
        _check_eps(self.eps)


@dataclass
class AttnQuantConfig:
    """Quantizers on q, k, v and on the softmax output inside every attention."""

    bits: int  # 1..8, shared by the four quantizers
    symmetric: bool = True
    # None = auto: q, k, v signed, softmax output unsigned ({0, 1, 2} at 2 bits, 'pos attn');
    # True = all signed (softmax {-1, 0, 1}: the log's first 'attn q' runs)
    signed: bool | None = None
    probs_signed: InitVar[bool | None] = None  # removed: quant.attn.signed
    eps: float = 1e-5  # floor of the steps

    def __post_init__(self, probs_signed):
        _check_bits(self.bits)
        _check_eps(self.eps)
        if probs_signed:
            raise ValueError("probs_signed was replaced by quant.attn.signed: write quant.attn.signed=true "
                             "(softmax levels {-1, 0, 1}); null = auto ({0, 1, 2})")


def _check_head_stem(bits, weight, act) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"quant.head_stem_bits={bits!r} is not supported: use an integer in 2..8 (8 in seed 004) "
                         "or null")
    if weight is None and act is None:
        raise ValueError(f"quant.head_stem_bits={bits} quantizes the stem and head like the other layers: set "
                         "quant.weight and/or quant.act, or quant.head_stem_bits=null")


def _check_groups(groups, dynamic, act, attn) -> None:
    if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
        raise ValueError(f"quant.n_groups={groups!r} is not supported: use an integer >= 1 (seed 004: 8) or null")
    if groups is not None and act is None and attn is None:
        raise ValueError(f"quant.n_groups={groups} groups input channels: set quant.act (e.g. quant=w4a4) or "
                         "quant.n_groups=null")
    if dynamic and groups is None:
        raise ValueError("quant.dynamic_groups=true assigns channels to groups at run time: set quant.n_groups "
                         "(e.g. 8) or quant.dynamic_groups=false")


def _nested(cls, value, where: str):
    """`value` as a `cls` instance: dicts (e.g. from OmegaConf.to_container) are converted and checked."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a mapping, {cls.__name__} or null, got {type(value).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(inspect.signature(cls).parameters))  # removed keys raise in the class
    if unknown:
        raise TypeError(f"{where}: unknown keys {unknown}; valid keys are {valid}")
    try:
        return cls(**value)
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from None


def _example(patterns) -> str:
    return _patterns(patterns, "")[0] if patterns else "<pattern>"


def _overrides(value) -> dict[str, bool]:
    """quant.signed_overrides as a {fnmatch pattern: bool} dict (null: none)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, bool) for k, v in value.items()):
        raise TypeError(f"quant.signed_overrides must map fnmatch patterns to true/false, got {value!r}; "
                        "e.g. {'classifier.blocks.*.linear1': false}")
    return dict(value)


def _patterns(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{where} must be a list of fnmatch patterns (strings), got {value!r}")
    return list(value)


@dataclass
class QuantConfig:
    """What to quantize and how (reference §3).

    Signedness of an activation quantizer (a layer input or an attention QuantPoint), one rule:
    the last `signed_overrides` pattern matching its name, else `act.signed` (layers) / `attn.signed`
    (points), else auto: unsigned where the model marks the input >= 0 (`non_negative_inputs`,
    `QuantPoint.non_negative`), signed elsewhere.

    Example:
        QuantConfig(weight={"bits": 2}, act={"bits": 2}, attn={"bits": 2},
                    signed_overrides={"classifier.blocks.*.linear1": False})
    """

    weight: QuantizerConfig | None = None  # weight quantizer of every selected layer
    act: QuantizerConfig | None = None  # input-activation quantizer of every selected layer
    attn: AttnQuantConfig | None = None  # q, k, v and softmax-output quantizers (QuantPoints)
    modules: list[str] | None = None  # fnmatch patterns of layers; None = model.default_quant_modules
    exclude: list[str] = field(default_factory=list)  # patterns removed from the selection
    signed_overrides: dict[str, bool] | None = None  # {pattern: signed}, wins over the rest; None = {}
    learnable_bias: bool = False  # zero-init learnable bias added before each activation quantizer
    # the Linear layers of every attention (qkv, proj) get PyTorch's default init before quantizing, as the
    # log's 'attn q' rows rebuilt them (reference §3.1); matters from scratch only (a checkpoint overwrites)
    attn_default_init: bool = False
    unsigned: InitVar[list[str] | None] = None  # removed: signed_overrides {pattern: false}
    signed: InitVar[list[str] | None] = None  # removed: signed_overrides {pattern: true}
    add_bias: bool = False  # give quantized layers without a bias a zero one (PTQ bias correction folds into it)
    # stem (Linear/Conv2d layers before the first selected one, module order) and head (after the last one)
    # are quantized too, with the weight / act settings at this many bits (seed 004: 8); None = left FP
    head_stem_bits: int | None = None
    # G >= 1: the inputs of the selected Linear layers that read a LayerNorm output (qat.quant.groups) get G steps
    # and a channel -> group assignment chosen from per-channel ranges, and with attn the softmax outputs
    # min(G, heads) steps over their heads; None = act's / attn's own granularity
    n_groups: int | None = None
    dynamic_groups: bool = False  # channels pick their group per input instance at run time (IGQ-ViT)

    def __post_init__(self, unsigned, signed):
        for old, value in (("unsigned", unsigned), ("signed", signed)):
            if value:  # an empty list (old checkpoints' default) meant nothing
                raise ValueError(f"quant.{old} was replaced by quant.signed_overrides: write "
                                 f"quant.signed_overrides={{{_example(value)}: {str(old == 'signed').lower()}}}")
        self.weight = _nested(QuantizerConfig, self.weight, "quant.weight")
        self.act = _nested(QuantizerConfig, self.act, "quant.act")
        self.attn = _nested(AttnQuantConfig, self.attn, "quant.attn")
        if self.modules is not None:
            self.modules = _patterns(self.modules, "quant.modules")
        self.exclude = _patterns(self.exclude, "quant.exclude")
        self.signed_overrides = _overrides(self.signed_overrides)
        if self.head_stem_bits is not None:
            _check_head_stem(self.head_stem_bits, self.weight, self.act)
        _check_groups(self.n_groups, self.dynamic_groups, self.act, self.attn)
        if self.learnable_bias and self.act is None:
            raise ValueError("quant.learnable_bias=True adds a bias before the activation quantizer: set quant.act")

    @property
    def is_fp(self) -> bool:
        """True when nothing is quantized."""
        return self.weight is None and self.act is None and self.attn is None
