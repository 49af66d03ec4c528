"""The quantizer lifecycle of a Lightning run: calibrate at fit start, check ranks agree, clamp steps."""
import logging
from collections.abc import Callable

import torch
from lightning.pytorch import Callback

from qat.quant.calibrate import calibrate_
from qat.quant.quantizers import clamp_steps_, quantizers

log = logging.getLogger(__name__)


class QuantizationCallback(Callback):
    """Initialises the student's quantizers before training and keeps their steps >= eps after every step.

    Acts on `pl_module.model` (the student; a teacher is not a submodule and is not touched).

    Args:
        calibration: callable returning one training batch (x, y), e.g. `datamodule.calibration_batch`;
            None leaves pending quantizers to initialise on the first training batch.
    """

    def __init__(self, calibration: Callable[[], tuple] | None = None):
        self.calibration = calibration

    def on_fit_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        pending = [n for n, q in quantizers(model) if not q.is_initialized]
        if not pending:
            return
        if self.calibration is not None:
            x, _ = self.calibration()
            done = calibrate_(model, [x.to(pl_module.device)])
            log.info("initialised %d quantizer steps from a calibration batch of %d images", len(done), len(x))
        if trainer.world_size > 1:
            check_steps_match_across_ranks(model, pl_module.all_gather)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        clamp_steps_(pl_module.model)  # right after the optimizer step, before the next forward (reference §7.3)


def check_steps_match_across_ranks(model: torch.nn.Module, all_gather) -> None:
    """Raise naming the first quantizer whose step differs between ranks; `all_gather` stacks a tensor per rank."""
    named = list(quantizers(model))
    steps = torch.cat([q.step.detach().flatten() for _, q in named])
    owner = [n for n, q in named for _ in range(q.step.numel())]
    gathered = all_gather(steps)  # (world, n)
    differ = (gathered != gathered[0]).any(0).nonzero()
    if len(differ):
        raise RuntimeError(f"quantizer steps differ across ranks after initialisation: {owner[differ[0].item()]}")
    log.info("quantizer steps identical on all %d ranks after initialisation", len(gathered))
