"""Quantization settings as validated dataclasses (the `quant` config group builds QuantConfig)."""
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from qat.quant.quantizers import INITS


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not supported: use an integer in 1..8")


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

    def __post_init__(self):
        _check_bits(self.bits)
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is not supported; choose one of {list(INITS)}")


@dataclass
class AttnQuantConfig:
    """Quantizers on q, k, v (signed) and on the softmax output inside every attention."""

    bits: int  # 1..8, shared by the four quantizers
    symmetric: bool = True
    probs_signed: bool = False  # False: softmax levels {0, 1, 2} at 2 bits ('pos attn'); True: {-1, 0, 1}

    def __post_init__(self):
        _check_bits(self.bits)


def _nested(cls, value, where: str):
    """`value` as a `cls` instance: dicts (e.g. from OmegaConf.to_container) are converted and checked."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a mapping, {cls.__name__} or null, got {type(value).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise TypeError(f"{where}: unknown keys {unknown}; valid keys are {valid}")
    try:
        return cls(**value)
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from None


def _patterns(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{where} must be a list of fnmatch patterns (strings), got {value!r}")
    return list(value)


@dataclass
class QuantConfig:
    """What to quantize and how (reference §3).

    Example:
        QuantConfig(weight={"bits": 2}, act={"bits": 2}, attn={"bits": 2})
    """

    weight: QuantizerConfig | None = None  # weight quantizer of every selected layer
    act: QuantizerConfig | None = None  # input-activation quantizer of every selected layer
    attn: AttnQuantConfig | None = None  # q, k, v and softmax-output quantizers (QuantPoints)
    modules: list[str] | None = None  # fnmatch patterns of layers; None = model.default_quant_modules
    exclude: list[str] = field(default_factory=list)  # patterns removed from the selection
    unsigned: list[str] = field(default_factory=list)  # layers whose input quantizer is forced unsigned
    signed: list[str] = field(default_factory=list)  # layers whose input quantizer is forced signed
    learnable_bias: bool = False  # zero-init learnable bias added before each activation quantizer
    add_bias: bool = False  # give quantized layers without a bias a zero one (PTQ bias correction folds into it)

    def __post_init__(self):
        self.weight = _nested(QuantizerConfig, self.weight, "quant.weight")
        self.act = _nested(QuantizerConfig, self.act, "quant.act")
        self.attn = _nested(AttnQuantConfig, self.attn, "quant.attn")
        if self.modules is not None:
            self.modules = _patterns(self.modules, "quant.modules")
        for name in ("exclude", "unsigned", "signed"):
            setattr(self, name, _patterns(getattr(self, name), f"quant.{name}"))
        forced = [n for n in ("unsigned", "signed") if getattr(self, n)]
        if forced and (self.act is None or self.act.signed is not None):
            why = "quant.act is null" if self.act is None else f"quant.act.signed={self.act.signed} applies to all"
            raise ValueError(f"quant.{forced[0]} is set but {why}; set quant.act.signed=null to pick per layer")
        if self.learnable_bias and self.act is None:
            raise ValueError("quant.learnable_bias=True adds a bias before the activation quantizer: set quant.act")

    @property
    def is_fp(self) -> bool:
        """True when nothing is quantized."""
        return self.weight is None and self.act is None and self.attn is None
