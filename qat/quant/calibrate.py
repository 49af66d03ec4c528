"""Quantizer calibration: set the steps (and offsets) of a quantized model from data before training or PTQ."""
import logging
from collections.abc import Iterable

import torch
from torch import nn

from qat.quant.quantizers import quantizers

log = logging.getLogger(__name__)


def inputs_of(batch) -> torch.Tensor:
    """The images of a batch given as a tensor or an (images, labels) pair."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable) -> list[str]:
    """Initialise every not-yet-initialised quantizer of `model` from `batches`; returns their names.

    `batches` yields image tensors or (x, y) pairs. Each quantizer applies its own `init` (lsq | minmax | mse)
    to what it sees in one train-mode forward of the first batch (steps are averaged over ranks when
    torch.distributed is initialized); the model's train/eval mode is restored afterwards.
    Quantizers already initialised (e.g. loaded from a checkpoint) are left untouched. Observers over many
    batches (minmax, mse, percentile, aciq, omse per layer or channel) are PTQ's: `qat.ptq.calibrate`.
    """
    pending = [n for n, q in quantizers(model) if not q.is_initialized]
    if not pending:
        return []
    batch = next(iter(batches), None)
    if batch is None:
        raise ValueError(f"calibrate_: batches is empty but {len(pending)} quantizers need initialising: "
                         "pass at least one batch of training images")
    x = inputs_of(batch).to(next(model.parameters()).device)
    was_training = model.training
    try:
        model.train()(x)
    finally:
        model.train(was_training)
    named = dict(quantizers(model))
    done = [n for n in pending if named[n].is_initialized]
    if len(done) < len(pending):
        log.warning("calibration did not reach %d quantizers (not called in the forward): %s",
                    len(pending) - len(done), [n for n in pending if n not in done][:5])
    return done
