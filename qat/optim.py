"""Optimizer settings, parameter groups, the per-epoch cosine schedule and gradient clipping."""
import logging
from dataclasses import dataclass

import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import dispatch_clip_grad
from torch import nn

from qat.quant import LSQQuantizer, QuantLayerMixin

log = logging.getLogger(__name__)

NO_DECAY_NAMES = ("positional_emb", "class_emb", "pos_embed", "cls_token")
OPTIMIZERS = ("adamw", "sgd")
CLIP_MODES = ("norm", "agc", "value")
LR_SCALE_RULES = ("none", "linear")


@dataclass
class OptimConfig:
    """Optimizer and schedule settings (conf/optim); `name`, `clip_mode` and `lr_scale_rule` are checked on
    construction."""

    name: str = "adamw"  # adamw (betas, eps) | sgd (momentum, nesterov; weight decay as L2)
    lr: float = 5.5e-4
    epochs: int | None = None  # schedule length; None = trainer.max_epochs (set both to train part of one)
    weight_decay: float = 0.06
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    warmup_epochs: int = 10
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    cooldown_epochs: int = 10
    quant_lr: float | None = None  # own lr for quantizer steps/offsets/learnable biases
    clip_grad: float | None = None
    clip_mode: str = "norm"
    lr_scale_rule: str = "none"  # applied by qat.run before the module is built
    decay_embeddings: bool = True  # class token / position embedding decayed as in the original (reference §2.6)

    def __post_init__(self):
        for key, valid in (("name", OPTIMIZERS), ("clip_mode", CLIP_MODES), ("lr_scale_rule", LR_SCALE_RULES)):
            value = getattr(self, key)
            if value not in valid:
                raise ValueError(f"optim.{key}={value!r} is not valid: use one of {list(valid)}")


def build_optimizer(groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    """optim.name over the parameter groups (each group carries its own weight decay)."""
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def quant_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The quantizers' own parameters (steps, offsets) and the quantized layers' `input_bias`, by identity."""
    found = {}
    for module in model.modules():
        if isinstance(module, LSQQuantizer):
            found.update((id(p), p) for p in module.parameters())
        elif isinstance(module, QuantLayerMixin) and module.input_bias is not None:
            found[id(module.input_bias)] = module.input_bias
    return list(found.values())


def param_groups(model: nn.Module, weight_decay: float, quant_lr: float | None,
                 decay_embeddings: bool = True) -> list[dict]:
    """AdamW groups: decayed weights (ndim >= 2, as timm); no decay for norms and biases, nor for the class and
    position embeddings when not `decay_embeddings`; quantizer parameters in their own group without decay."""
    no_decay_names = () if decay_embeddings else NO_DECAY_NAMES
    quant_ids = {id(p) for p in quant_parameters(model)}
    decay, no_decay, quant = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in quant_ids:
            quant.append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if quant:
        group = {"params": quant, "weight_decay": 0.0, "name": "quant"}
        if quant_lr is not None:
            group["lr"] = quant_lr
        groups.append(group)
    return [g for g in groups if g["params"]]


def cosine_schedule(optimizer, max_epochs: int, warmup_epochs: int, warmup_lr: float, min_lr: float,
                    cooldown_epochs: int) -> CosineLRScheduler:
    """timm's per-epoch cosine: warmup from warmup_lr, cosine to min_lr, then cooldown at min_lr."""
    if warmup_epochs + cooldown_epochs >= max_epochs:
        log.warning("schedule of %d epochs is too short for warmup %d + cooldown %d: using neither",
                    max_epochs, warmup_epochs, cooldown_epochs)
        warmup_epochs = cooldown_epochs = 0
    return CosineLRScheduler(optimizer, t_initial=max_epochs - cooldown_epochs, lr_min=min_lr,
                             warmup_t=warmup_epochs, warmup_lr_init=warmup_lr, cycle_limit=1, t_in_epochs=True)


def clip_gradients(model: nn.Module, value: float, mode: str) -> None:
    """Clip by global norm, by value, or adaptively (AGC, classifier excluded as in the reference)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if mode == "agc":
        params = params[:-2]  # last two parameters: the classifier weight and bias
    dispatch_clip_grad(params, value=value, mode=mode)
