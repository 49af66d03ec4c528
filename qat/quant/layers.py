"""QuantLinear / QuantConv2d: y = layer(Q_a(x + input_bias), Q_w(W)) + b (reference §3.1).

The input quantizer runs inside the layer's autograd function (`lsq_layer`), so a quantized layer keeps
x for backward as the float layer does, not Q(x) as well. Evaluated without grad, a layer computes its
integer form (`qat.quant.integer`): the same function, summed exactly, as the exported integer model.
"""
import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.functional import Conv2dOp, LinearOp
from qat.quant.integer import IntConv2d, IntLinear, integer_ready
from qat.quant.quantizers import LSQQuantizer


class QuantLayerMixin:
    """Shared logic of the quant layers.

    Children `weight_quantizer` and `act_quantizer` are LSQQuantizers or nn.Identity (then the layer
    has exactly the float layer's state_dict keys); `input_bias` is an optional zero-init Parameter
    added to the input before the activation quantizer.
    """

    float_cls: type[nn.Module]
    integer_cls: type[nn.Module]  # its integer form (qat.quant.integer), used by eval forwards without grad

    def _setup_quant(self, weight_cfg, act_cfg, act_signed: bool, learnable_bias: bool) -> None:
        """Add the quantizers and the optional input bias, on the weight's device (called once per layer)."""
        device = self.weight.device
        self.weight_quantizer = nn.Identity() if weight_cfg is None else LSQQuantizer.from_config(
            weight_cfg, signed=True if weight_cfg.signed is None else weight_cfg.signed,
            channels=self.weight.shape[0], ch_axis_ndim=self.weight.ndim).to(device)
        bias_shape = self._input_bias_shape()
        in_shape = {"channels": bias_shape[0], "ch_axis": -len(bias_shape)}  # per-channel inputs: dim C of x
        self.act_quantizer = nn.Identity() if act_cfg is None else LSQQuantizer.from_config(
            act_cfg, signed=act_signed, **(in_shape if act_cfg.per_channel else {})).to(device)
        bias = nn.Parameter(torch.zeros(bias_shape, device=device)) if learnable_bias else None
        self.register_parameter("input_bias", bias)

    def _quant_forward(self, op, x: torch.Tensor, float_forward) -> torch.Tensor:
        """The layer on Q_a(x + input_bias) and Q_w(W); `op` (None: not fusable) fuses the input quantizer."""
        if integer_ready(self):
            return self.integer_cls(self)(x)
        if self.input_bias is not None:
            x = x + self.input_bias
        weight = self.weight_quantizer(self.weight)
        quantizer = self.act_quantizer
        if op is not None and isinstance(quantizer, LSQQuantizer) and quantizer.fusable():
            return quantizer.layer(op, x, weight, self.bias)
        return float_forward(quantizer(x), weight, self.bias)

    @classmethod
    def from_float(cls, mod: nn.Module, weight_cfg=None, act_cfg=None, act_signed: bool = True,
                   learnable_bias: bool = False):
        """Wrap `mod`, sharing its weight and bias Parameter objects (no copy).

        Only the float layer's constructor runs (on the meta device: no allocation, no RNG use), then its
        Parameters are swapped for `mod`'s and the quantizers are set up, once.
        """
        new = cls.__new__(cls)
        cls.float_cls.__init__(new, **cls._float_args(mod), bias=mod.bias is not None, device="meta")
        new.weight, new.bias = mod.weight, mod.bias
        new._setup_quant(weight_cfg, act_cfg, act_signed, learnable_bias)
        return new.train(mod.training)

    def to_float(self) -> nn.Module:
        """The plain layer with the same weight and bias Parameters (quantizers dropped)."""
        if self.input_bias is not None:
            raise ValueError("to_float() would drop the learnable input_bias and change the outputs; "
                             "build the quantized model without quant.learnable_bias to convert it")
        mod = self.float_cls(**self._float_args(self), bias=self.bias is not None, device="meta")
        mod.weight, mod.bias = self.weight, self.bias
        return mod.train(self.training)


class QuantLinear(QuantLayerMixin, nn.Linear):
    float_cls = nn.Linear
    integer_cls = IntLinear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_cfg=None, act_cfg=None,
                 act_signed: bool = True, learnable_bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_quant(weight_cfg, act_cfg, act_signed, learnable_bias)

    @staticmethod
    def _float_args(mod: nn.Linear) -> dict:
        return {"in_features": mod.in_features, "out_features": mod.out_features}

    def _input_bias_shape(self) -> tuple:
        return (self.in_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_forward(LinearOp, x, F.linear)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    float_cls = nn.Conv2d
    integer_cls = IntConv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", weight_cfg=None, act_cfg=None,
                 act_signed: bool = True, learnable_bias: bool = False, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self._setup_quant(weight_cfg, act_cfg, act_signed, learnable_bias)

    @staticmethod
    def _float_args(mod: nn.Conv2d) -> dict:
        return {"in_channels": mod.in_channels, "out_channels": mod.out_channels, "kernel_size": mod.kernel_size,
                "stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups,
                "padding_mode": mod.padding_mode}

    def _input_bias_shape(self) -> tuple:
        return (self.in_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero_padded = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        op = Conv2dOp(self.stride, self.padding, self.dilation, self.groups) if zero_padded else None
        return self._quant_forward(op, x, self._conv_forward)
