"""Reconstruction PTQ in seed 003's general form: a loop over units (a layer, a BRECQ block or the whole network)
that fits each unit's quantized output to the FP one on calibration data, learning any subset of
{s_w, s_w_dq, s_x, alpha, xi, eta, b, w} (qat.ptq.recon_weight), with optional QDrop.

AdaRound / BRECQ, QDrop, NWQ, Case 2.2, AdaQTransform and LSQ-style corners are presets of ReconConfig
(conf/ptq/*.yaml). Unit inputs come from the quantized model with the earlier units already reconstructed;
targets are the FP model's unit outputs (or the labels, objective ce), from a copy taken before the first unit is
fitted (or before bias correction, by ptq.py): a fitted unit's folded weights are fitted to quantized inputs and
would move every later target. Both are cached on CPU in float16.
"""
import copy
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qat.models.layers import TransformerEncoderLayer
from qat.models.resnet_cifar import BasicBlock
from qat.ptq.adaround import BetaSchedule, regularizer
from qat.ptq.calibrate import inputs_of
from qat.ptq.recon_weight import LEARNABLE, ROUNDINGS, attach_, fold_
from qat.quant import LSQQuantizer, QuantLayerMixin, quantizers_off

log = logging.getLogger(__name__)
BLOCKS = (BasicBlock, TransformerEncoderLayer)  # BRECQ blocks: a residual block, a transformer block
GRANULARITIES = ("layer", "block", "network")
OBJECTIVES = ("weight_mse", "output_mse", "ce")
WEIGHT_ONLY = ("alpha", "s_w", "s_w_dq", "xi")  # what weight_mse (no data) can learn


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"ptq.recon.{key}={value!r}: choose one of {list(choices)}")


@dataclass
class ReconConfig:
    """Reconstruction settings (the `ptq.recon.*` keys). The defaults are AdaRound with the input steps learnt."""
    rounding: str = "adaround"  # nearest | adaround
    learn: tuple = ("alpha", "s_x")  # subset of LEARNABLE
    decoupled: bool = False  # de-quantize with a step s_w' of its own (frozen unless s_w_dq is learnt)
    granularity: str = "block"  # layer | block | network
    objective: str = "output_mse"  # weight_mse | output_mse | ce (labels; network)
    drop_prob: float = 0.0  # QDrop: each activation element stays FP with this probability while fitting
    iters: int = 1000
    batch_size: int = 32
    lr: float = 4e-3  # Adam on alpha; h reaches 0 or 1 once lr * iters >~ 3 (the papers: 1e-3 * 20k iterations)
    step_lr: float = 4e-5  # on s_x, s_w, s_w_dq
    transform_lr: float = 1e-3  # on xi, eta, b
    weight_lr: float = 1e-5  # on w
    reg_weight: float = 0.01  # lambda of the rounding regulariser
    warmup: float = 0.2  # fraction of iterations without the regulariser
    beta: tuple = (20.0, 2.0)  # annealed from beta[0] to beta[1]
    seed: int = 0

    def __post_init__(self):
        self.learn = tuple(self.learn)
        _choice("rounding", self.rounding, ROUNDINGS)
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("objective", self.objective, OBJECTIVES)
        unknown = [k for k in self.learn if k not in LEARNABLE]
        if unknown:
            raise ValueError(f"ptq.recon.learn={list(self.learn)}: unknown {unknown}; choose from {list(LEARNABLE)}")
        if ("alpha" in self.learn) != (self.rounding == "adaround"):
            raise ValueError(f"ptq.recon.learn={list(self.learn)} with rounding={self.rounding}: alpha is the "
                             "AdaRound parameter; learn alpha exactly when ptq.recon.rounding=adaround")
        if self.objective == "ce" and self.granularity != "network":
            raise ValueError(f"ptq.recon.objective=ce needs labels at the network output: set "
                             f"ptq.recon.granularity=network (not {self.granularity!r})")
        if self.objective == "weight_mse" and set(self.learn) - set(WEIGHT_ONLY):
            raise ValueError(f"ptq.recon.objective=weight_mse sees no data: it learns only {list(WEIGHT_ONLY)}, "
                             f"not {sorted(set(self.learn) - set(WEIGHT_ONLY))}; use objective=output_mse")
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f"ptq.recon.drop_prob={self.drop_prob}: use a probability in [0, 1) (0.5 for QDrop)")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"ptq.recon.iters={self.iters} and ptq.recon.batch_size={self.batch_size} must be >= 1")
        for key in ("lr", "step_lr", "transform_lr", "weight_lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"ptq.recon.{key}={getattr(self, key)} must be > 0; to freeze a parameter, "
                                 "leave it out of ptq.recon.learn")


def has_weight_quantizer(m: nn.Module) -> bool:
    return isinstance(m, QuantLayerMixin) and isinstance(m.weight_quantizer, LSQQuantizer)


def units(model: nn.Module, granularity: str) -> list[tuple[str, nn.Module]]:
    """(name, module) to reconstruct in model order: quantized layers, blocks (layers outside any block are
    units of their own) or the whole network ("")."""
    if granularity == "network":
        return [("", model)] if any(has_weight_quantizer(m) for m in model.modules()) else []
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
    """The unit's inputs (or outputs) over `batches`, float16 on CPU; each forward stops at the unit. The
    result is allocated once, at the first batch, and filled in place (no list of chunks to concatenate)."""
    total, kept, at = sum(len(inputs_of(b)) for b in batches), None, 0

    def hook(module, args, out=None):
        nonlocal kept, at
        x = (out if output else args[0]).detach()
        if kept is None:
            kept = torch.empty((total, *x.shape[1:]), dtype=torch.float16)
        kept[at:at + len(x)] = x
        at += len(x)
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
    return kept


@contextmanager
def dropping(acts: list[LSQQuantizer], p: float, seed: int):
    """QDrop: while active, each element of a quantizer's input skips quantization with probability p."""
    gens = {}

    def hook(q, args, out):
        x = args[0]
        if x.device not in gens:
            gens[x.device] = torch.Generator(x.device).manual_seed(seed)
        return torch.where(torch.rand(x.shape, device=x.device, generator=gens[x.device]) < p, x, out)

    handles = [q.register_forward_hook(hook) for q in acts] if p > 0 else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def param_groups(layers: list, weights: list, acts: list, cfg: ReconConfig) -> list[dict]:
    """Adam groups of the learnt set; sets requires_grad on exactly those tensors."""
    picks = {"alpha": ([w.alpha for w in weights], cfg.lr), "s_x": ([q.step for q in acts], cfg.step_lr),
             "s_w": ([w.s_w for w in weights], cfg.step_lr), "s_w_dq": ([w.s_dq for w in weights], cfg.step_lr),
             "xi": ([w.xi for w in weights], cfg.transform_lr), "eta": ([w.eta for w in weights], cfg.transform_lr),
             "b": ([m.bias for m in layers if m.bias is not None], cfg.transform_lr),
             "w": ([m.weight for m in layers], cfg.weight_lr)}
    groups = []
    for key in cfg.learn:
        params, lr = picks[key]
        for p in params:
            p.requires_grad_(True)
        if params:
            groups.append({"params": params, "lr": lr, "name": key})
    return groups


def output_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction error: the squared error summed over channels (dim 1 of conv maps, the last dim
    otherwise) and averaged over the batch and positions, the scale the rounding regulariser's weight is set for."""
    error = (out - target).square()
    return error.sum(1 if error.ndim == 4 else -1).mean()


def unit_loss(unit: nn.Module, layers: list, x, y, cfg: ReconConfig) -> torch.Tensor:
    if cfg.objective == "weight_mse":
        return sum((m.weight_quantizer(m.weight) - m.weight).square().sum() for m in layers)
    if cfg.objective == "ce":
        return F.cross_entropy(unit(x), y.long())
    return output_error(unit(x), y)


@torch.no_grad()
def set_loss(unit: nn.Module, layers: list, inputs: torch.Tensor | None, targets: torch.Tensor | None,
             cfg: ReconConfig) -> float:
    """The unit's objective over every cached input, in batches, without QDrop and with the rounding as it stands:
    before fitting the calibrated start (nearest rounding), after folding the hard-rounded result."""
    if inputs is None:
        return float(unit_loss(unit, layers, None, None, cfg))
    device, total = next(unit.parameters()).device, 0.0
    for i in range(0, len(inputs), cfg.batch_size):
        x, y = inputs[i:i + cfg.batch_size].to(device).float(), targets[i:i + cfg.batch_size].to(device)
        total += float(unit_loss(unit, layers, x, y, cfg)) * len(x)
    return total / len(inputs)


def fit_unit(unit: nn.Module, inputs: torch.Tensor | None, targets: torch.Tensor | None, cfg: ReconConfig) -> dict:
    """Fit the unit's learnt set on (inputs, targets), then fold it (`fold_`): an ordinary quantized unit.
    rec_loss = the last minibatch's loss while fitting (soft rounding, QDrop on); start_loss / final_loss =
    `set_loss` before fitting and after folding."""
    frozen = {p: p.requires_grad for p in unit.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    layers = [m for m in unit.modules() if has_weight_quantizer(m)]
    start = set_loss(unit, layers, inputs, targets, cfg)
    weights = [attach_(m, cfg.rounding, cfg.learn, cfg.decoupled) for m in layers]
    acts = [q for q in unit.modules() if isinstance(q, LSQQuantizer) and q.enabled]
    opt = torch.optim.Adam(param_groups(layers, weights, acts, cfg))
    schedule = BetaSchedule(cfg.iters, cfg.warmup, *cfg.beta)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(unit.parameters()).device
    with dropping(acts, cfg.drop_prob, cfg.seed):
        for it in range(cfg.iters):
            x = y = None
            if inputs is not None:  # weight_mse needs no data
                idx = torch.randint(len(inputs), (min(cfg.batch_size, len(inputs)),), generator=gen)
                x, y = inputs[idx].to(device).float(), targets[idx].to(device)
            rec = unit_loss(unit, layers, x, y, cfg)
            beta = schedule(it) if "alpha" in cfg.learn else None
            reg = sum(regularizer(w.alpha, beta) for w in weights) if beta is not None else rec.new_zeros(())
            opt.zero_grad(set_to_none=True)
            (rec.float() + cfg.reg_weight * reg).backward()
            opt.step()
            for w in weights:
                w.clamp_()
            for q in acts:
                q.step.data.clamp_(min=q.eps)
    soft = sum(float(((w.h() > 0) & (w.h() < 1)).sum()) for w in weights if w.alpha is not None)
    for m in layers:
        fold_(m)
    for p, flag in frozen.items():
        p.requires_grad_(flag)
    final = set_loss(unit, layers, inputs, targets, cfg)
    return {"rec_loss": float(rec.detach()), "start_loss": start, "final_loss": final, "undecided": soft}


def unit_data(model: nn.Module, reference: nn.Module | None, name: str, batches: list, cfg: ReconConfig):
    """(inputs, targets) of unit `name`: inputs in the quantized `model`, outputs in the FP `reference` (or
    the labels, objective ce); None for weight_mse."""
    if cfg.objective == "weight_mse":
        return None, None
    if cfg.objective == "ce":
        if not all(isinstance(b, (tuple, list)) for b in batches):
            raise ValueError("ptq.recon.objective=ce needs labelled calibration batches ((images, labels) pairs)")
        targets = torch.cat([b[1] for b in batches])
    else:
        with quantizers_off(reference):
            targets = capture(reference, reference.get_submodule(name), batches, output=True)
    return capture(model, model.get_submodule(name), batches, output=False), targets


def reconstruct_(model: nn.Module, batches: list, cfg: ReconConfig, reference: nn.Module | None = None
                 ) -> dict[str, dict]:
    """Reconstruct every unit of `model` in order (in place); returns {unit: final losses}.

    `reference` gives the FP targets with its quantizers off: a model of the same structure holding the FP weights
    and biases. Default: a copy of `model` taken now, right unless something changed them since quantize_ (bias
    correction does: pass a copy from before it)."""
    todo = units(model, cfg.granularity)
    if not todo:
        raise ValueError("ptq.recon: the model has no quantized layer with a weight quantizer to reconstruct; "
                         "set quant.weight (e.g. quant=w4a32) or ptq.recon.enabled=false")
    was_training = model.training
    model.eval()
    if reference is None and cfg.objective == "output_mse":
        reference = copy.deepcopy(model)
    report = {}
    for name, unit in todo:
        inputs, targets = unit_data(model, reference, name, batches, cfg)
        start = {k: v.clone() for k, v in unit.state_dict().items()}
        with torch.enable_grad():
            result = report[name or "network"] = fit_unit(unit, inputs, targets, cfg)
        if not all(math.isfinite(result[k]) for k in ("rec_loss", "final_loss") if k in result):  # keep the start
            unit.load_state_dict(start)
            result["diverged"] = True
            log.warning("recon %s: the loss became %s; the unit keeps its calibrated start (nearest rounding)",
                        name or "network", result["rec_loss"])
        log.info("recon %s: %s", name or "network", result)
        del inputs, targets  # free this unit's caches before the next unit's are captured
    model.train(was_training)
    return report
