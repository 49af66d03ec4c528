"""Optimizer parameter groups, the per-epoch cosine schedule and gradient clipping."""
import logging

from timm.scheduler import CosineLRScheduler
from timm.utils import dispatch_clip_grad
from torch import nn

log = logging.getLogger(__name__)

NO_DECAY_NAMES = ("positional_emb", "class_emb", "pos_embed", "cls_token")
CLIP_MODES = ("norm", "value", "agc")


def param_groups(model: nn.Module, weight_decay: float, quant_lr: float | None, is_quant_param) -> list[dict]:
    """AdamW groups: decayed weights; no decay for norms, biases, embeddings; quantizer params apart."""
    decay, no_decay, quant = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_quant_param(name):
            quant.append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES:
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


def check_clip_mode(mode: str) -> None:
    if mode not in CLIP_MODES:
        raise ValueError(f"optim.clip_mode={mode!r} is not one of {CLIP_MODES}")
