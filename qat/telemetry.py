"""Quantizer telemetry: per-layer step, clip fraction, quantization MSE and weight-code flips."""
from functools import partial

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.hooks import RemovableHandle

from qat.quant import LSQQuantizer, QuantLayerMixin, lsq_fake_quant, quantizers


def codes(x: torch.Tensor, quantizer: LSQQuantizer) -> torch.Tensor:
    """Integer level of every element minus qmin, as uint8 (0..255 holds every 1..8-bit level range)."""
    return (quantizer.levels(x) - quantizer.qmin).to(torch.uint8)


@torch.no_grad()
def quant_stats(x: torch.Tensor, quantizer: LSQQuantizer, out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Fraction of x outside [qmin, qmax] before clamping ('clip') and mean((Q(x) - x)^2) ('mse').

    `out` is Q(x) when already computed (the quantizer's output in a forward hook).
    """
    v = quantizer.normalized(x)
    if out is None:
        out = lsq_fake_quant(x.detach(), quantizer.step.detach(), quantizer.qmin, quantizer.qmax,
                             None if quantizer.offset is None else quantizer.offset.detach(), quantizer.binary,
                             quantizer.eps)
    return {"clip": ((v < quantizer.qmin) | (v > quantizer.qmax)).float().mean(),
            "mse": (out.detach().float() - x.detach().float()).square().mean()}


@torch.no_grad()
def weight_stats(weight: torch.Tensor, quantizer: LSQQuantizer) -> dict[str, torch.Tensor]:
    """`quant_stats` of a weight plus its integer `codes`."""
    return {**quant_stats(weight, quantizer), "codes": codes(weight, quantizer)}


def flip_fraction(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Fraction of integer codes that differ between two logs (weight oscillation)."""
    return (previous != current).float().mean()


def weight_quantizers(model: nn.Module) -> dict[int, torch.Tensor]:
    """id(weight quantizer) -> the weight it quantizes, for every quantized layer of `model`."""
    return {id(m.weight_quantizer): m.weight for m in model.modules() if isinstance(m, QuantLayerMixin)}


class QuantTelemetry(Callback):
    """Logs quantizer telemetry to every logger (CSV, W&B) every `every_n_steps` optimizer steps.

    Per quantizer `quant/<name>/`: `step` and `offset` (channel means), `clip` (fraction of inputs outside
    [qmin, qmax]) and `mse` (quantization error); weight quantizers also `flip`, the fraction of integer
    codes changed since the previous log (absent on the first log). Aggregates: `quant/mean_clip_act`,
    `quant/mean_clip_weight`, `quant/mean_flip`. Activation statistics come from forward hooks installed
    only for the logged batch; weight statistics from the weights after that batch's update. Rank zero
    only, no collectives. Uninitialised and disabled quantizers are skipped.

    Args:
        every_n_steps: log on the batch whose starting global step is a multiple of this (0, N, 2N, ...).
        histograms_every_n_epochs: with a WandbLogger, histograms of each weight quantizer's codes and
            steps at the end of every N-th training epoch (0 = off).
    """

    def __init__(self, every_n_steps: int = 50, histograms_every_n_epochs: int = 0):
        if every_n_steps < 1 or histograms_every_n_epochs < 0:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1 and "
                             f"histograms_every_n_epochs={histograms_every_n_epochs} >= 0")
        self.every_n_steps = every_n_steps
        self.histograms_every_n_epochs = histograms_every_n_epochs
        # codes of the last log, kept on the weight's device: comparing there needs no host copy of
        # every weight per log, and uint8 costs a quarter of the float32 weight
        self.prev_codes: dict[str, torch.Tensor] = {}
        self.act_stats: dict[str, dict[str, torch.Tensor]] = {}
        self.handles: list[RemovableHandle] = []
        self.armed_step: int | None = None  # global step of the batch being logged
        self.last_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if (step % self.every_n_steps or step == self.last_step or not trainer.loggers
                or not trainer.is_global_zero):
            return
        self.armed_step = self.last_step = step  # once per step under gradient accumulation
        weights = weight_quantizers(pl_module.model)
        self.handles = [q.register_forward_hook(partial(self._record, name))
                        for name, q in quantizers(pl_module.model) if q.enabled and id(q) not in weights]

    def _record(self, name: str, quantizer: LSQQuantizer, args: tuple, out: torch.Tensor) -> None:
        self.act_stats[name] = quant_stats(args[0], quantizer, out)  # the last call of the batch

    def _disarm(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.act_stats = {}
        self.armed_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.armed_step is None:
            return
        step, act_stats = self.armed_step, self.act_stats
        self._disarm()
        metrics = self.metrics(pl_module.model, act_stats)
        if metrics:
            values = torch.stack(list(metrics.values())).tolist()  # one host sync for all values
            for logger in trainer.loggers:
                logger.log_metrics(dict(zip(metrics, values)), step=step)

    def metrics(self, model: nn.Module, act_stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Scalar tensors by metric name; updates the stored weight codes."""
        weights = weight_quantizers(model)
        out: dict[str, torch.Tensor] = {}
        clips: dict[str, list[torch.Tensor]] = {"act": [], "weight": []}
        for name, q in quantizers(model):
            if not (q.enabled and q.is_initialized):
                continue
            out[f"quant/{name}/step"] = q.step.detach().float().mean()
            if q.offset is not None:
                out[f"quant/{name}/offset"] = q.offset.detach().float().mean()
            if id(q) in weights:
                stats = self._weight_metrics(name, q, weights[id(q)])
            elif name in act_stats:
                stats = act_stats[name]
            else:  # an activation quantizer not called in the logged batch
                continue
            clips["weight" if id(q) in weights else "act"].append(stats["clip"])
            out.update({f"quant/{name}/{key}": value for key, value in stats.items()})
        for kind, values in clips.items():
            if values:
                out[f"quant/mean_clip_{kind}"] = torch.stack(values).mean()
        flips = [value for key, value in out.items() if key.endswith("/flip")]
        if flips:
            out["quant/mean_flip"] = torch.stack(flips).mean()
        return out

    def _weight_metrics(self, name: str, quantizer: LSQQuantizer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """clip, mse and (from the second log on) flip of one weight quantizer; stores its codes."""
        stats = weight_stats(weight, quantizer)
        current = stats.pop("codes")
        if name in self.prev_codes:
            stats["flip"] = flip_fraction(self.prev_codes[name], current)
        self.prev_codes[name] = current
        return stats

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        n = self.histograms_every_n_epochs
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not n or (trainer.current_epoch + 1) % n or not loggers or not trainer.is_global_zero:
            return
        import wandb

        weights = weight_quantizers(pl_module.model)
        histograms = {}
        for name, q in quantizers(pl_module.model):
            if id(q) not in weights or not (q.enabled and q.is_initialized):
                continue
            levels = codes(weights[id(q)], q).cpu().numpy().astype(np.int64) + q.qmin
            edges = np.arange(q.qmin, q.qmax + 2) - 0.5  # one bin per integer level
            histograms[f"quant/{name}/codes"] = wandb.Histogram(np_histogram=np.histogram(levels, bins=edges))
            histograms[f"quant/{name}/steps"] = wandb.Histogram(q.step.detach().float().flatten().cpu().numpy())
        for logger in loggers:
            logger.log_metrics(histograms, step=trainer.global_step)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._disarm()  # a batch that raised before on_train_batch_end
