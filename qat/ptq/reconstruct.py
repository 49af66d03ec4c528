"""Reconstruction: a loop over units (a layer, or a BRECQ block) that fits each unit's quantized output to
the FP output on calibration data, learning AdaRound rounding (and, with quantized inputs, the activation
steps by LSQ on the same loss).

Unit inputs come from the quantized model with the earlier units already reconstructed; targets are the FP
model's unit outputs. Both are cached on CPU in float16, one unit at a time.
"""
import logging
from dataclasses import dataclass

import torch
from torch import nn

from qat.models.layers import TransformerEncoderLayer
from qat.models.resnet_cifar import BasicBlock
from qat.ptq.adaround import BetaSchedule, attach_, bake_
from qat.ptq.calibrate import inputs_of
from qat.quant import LSQQuantizer, QuantLayerMixin, quantizers_off

log = logging.getLogger(__name__)
BLOCKS = (BasicBlock, TransformerEncoderLayer)  # BRECQ blocks: a residual block, a transformer block


@dataclass
class ReconConfig:
    """Reconstruction settings (the `ptq.recon_*` keys)."""
    granularity: str = "block"  # layer | block
    iters: int = 1000
    batch_size: int = 32
    lr: float = 1e-3  # Adam on the AdaRound alphas
    act_lr: float = 4e-5  # Adam on the activation steps (0 = keep them fixed)
    reg_weight: float = 0.01  # lambda of the rounding regulariser
    warmup: float = 0.2  # fraction of iterations without the regulariser
    beta: tuple = (20.0, 2.0)  # annealed from beta[0] to beta[1]
    seed: int = 0

    def __post_init__(self):
        if self.granularity not in ("layer", "block"):
            raise ValueError(f"ptq.recon_granularity={self.granularity!r}: choose 'layer' or 'block'")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"ptq.recon_iters={self.iters} and ptq.recon_batch_size={self.batch_size} must be >= 1")


def has_weight_quantizer(m: nn.Module) -> bool:
    return isinstance(m, QuantLayerMixin) and isinstance(m.weight_quantizer, LSQQuantizer)


def units(model: nn.Module, granularity: str) -> list[tuple[str, nn.Module]]:
    """(name, module) to reconstruct in model order: quantized layers, or blocks (layers outside any block
    are units of their own)."""
    found, inside = [], ()
    for name, m in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if granularity == "block" and isinstance(m, BLOCKS) and any(has_weight_quantizer(c) for c in m.modules()):
            found.append((name, m))
            inside = name + "."
        elif has_weight_quantizer(m):
            found.append((name, m))
    return found


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the unit's tensor is captured."""


@torch.no_grad()
def capture(model: nn.Module, unit: nn.Module, batches: list, output: bool) -> torch.Tensor:
    """The unit's inputs (or outputs) over `batches`, float16 on CPU; each forward stops at the unit."""
    kept = []

    def hook(module, args, out=None):
        kept.append((out if output else args[0]).detach().to("cpu", torch.float16))
        raise _Stop

    handle = unit.register_forward_hook(hook) if output else unit.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            try:
                model(inputs_of(batch))
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(kept)


def fit_unit(unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, cfg: ReconConfig) -> dict:
    """AdaRound the unit's weights (and LSQ its input steps) on (inputs, targets); bakes the rounding."""
    frozen = {p: p.requires_grad for p in unit.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    layers = [m for m in unit.modules() if has_weight_quantizer(m)]
    roundings = [attach_(m) for m in layers]
    acts = [q for q in unit.modules() if isinstance(q, LSQQuantizer) and q.enabled]
    for q in acts:
        q.step.requires_grad_(cfg.act_lr > 0)
    groups = [{"params": [r.alpha for r in roundings], "lr": cfg.lr}]
    if acts and cfg.act_lr > 0:
        groups.append({"params": [q.step for q in acts], "lr": cfg.act_lr})
    opt = torch.optim.Adam(groups)
    schedule = BetaSchedule(cfg.iters, cfg.warmup, *cfg.beta)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(unit.parameters()).device
    for it in range(cfg.iters):
        idx = torch.randint(len(inputs), (min(cfg.batch_size, len(inputs)),), generator=gen)
        x, y = inputs[idx].to(device).float(), targets[idx].to(device).float()
        rec = (unit(x) - y).square().flatten(1).sum(1).mean()
        beta = schedule(it)
        reg = sum(r.regularizer(beta) for r in roundings) if beta is not None else rec.new_zeros(())
        opt.zero_grad(set_to_none=True)
        (rec + cfg.reg_weight * reg).backward()
        opt.step()
        for q in acts:
            q.step.data.clamp_(min=q.eps)
    soft = sum(float(((r.h() > 0) & (r.h() < 1)).sum()) for r in roundings)
    for m in layers:
        bake_(m)
    for p, flag in frozen.items():
        p.requires_grad_(flag)
    return {"rec_loss": float(rec.detach()), "undecided": soft}


def reconstruct_(model: nn.Module, batches: list, cfg: ReconConfig) -> dict[str, dict]:
    """Reconstruct every unit of `model` in order (in place); returns {unit: final losses}."""
    todo = units(model, cfg.granularity)
    if not todo:
        raise ValueError("ptq.recon: the model has no quantized layer with a weight quantizer to reconstruct; "
                         "set quant.weight (e.g. quant=w4a32) or ptq.recon=null")
    was_training = model.training
    model.eval()
    report = {}
    for name, unit in todo:
        with quantizers_off(model):
            targets = capture(model, unit, batches, output=True)
        inputs = capture(model, unit, batches, output=False)
        with torch.enable_grad():
            report[name] = fit_unit(unit, inputs, targets, cfg)
        log.info("recon %s: %s", name, report[name])
    model.train(was_training)
    return report
