"""Run outputs: atomic checkpoints, summary.json, epoch summary lines, images/s."""
import json
import logging
import os
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<name>.tmp`, fsync, then rename: a kill during a save never leaves a corrupt file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunSummary(Callback):
    """Tracks validation accuracy per epoch, logs one summary line per epoch, writes summary.json.

    Args:
        output_dir: the run dir.
        meta: run facts copied into summary.json (model, quant, kd, overrides, teacher, ...).
    """

    def __init__(self, output_dir: str | Path, meta: dict):
        self.path = Path(output_dir) / "summary.json"
        self.meta = meta
        self.history: list[float] = []
        self.epoch_start = time.perf_counter()
        self.summary: dict = {}

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/acc1" in trainer.callback_metrics:
            self.history.append(100.0 * float(trainer.callback_metrics["val/acc1"]))

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after this epoch's validation
        m = trainer.callback_metrics
        train_loss = float(m["train/loss_epoch"]) if "train/loss_epoch" in m else float("nan")
        val = f"{self.history[-1]:.2f} (best {max(self.history):.2f})" if self.history else "-"
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        log.info("epoch %d/%d | train/loss %.4f | val/acc1 %s | lr %.3g | %.1fs", trainer.current_epoch + 1,
                 trainer.max_epochs, train_loss, val, lr, time.perf_counter() - self.epoch_start)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        ckpt = trainer.checkpoint_callback
        self.summary = {
            **self.meta,
            "best_val_acc": max(self.history) if self.history else None,
            "final_val_acc": self.history[-1] if self.history else None,
            "epochs_completed": trainer.current_epoch,
            "max_epochs": trainer.max_epochs,
            "finished": trainer.current_epoch >= trainer.max_epochs and not trainer.interrupted,
            "best_ckpt": getattr(ckpt, "best_model_path", None) or None,
            "last_ckpt": str(Path(ckpt.dirpath) / "last.ckpt") if ckpt is not None and ckpt.dirpath else None,
        }
        write_json_atomic(self.path, self.summary)
        log.info("summary: best val acc %s, final %s -> %s", self.summary["best_val_acc"],
                 self.summary["final_val_acc"], self.path)

    @rank_zero_only
    def on_test_end(self, trainer, pl_module) -> None:
        if self.summary and "test/acc1" in trainer.callback_metrics:
            self.summary["test_acc"] = 100.0 * float(trainer.callback_metrics["test/acc1"])
            write_json_atomic(self.path, self.summary)


class Throughput(Callback):
    """Training images/s (all ranks) in the progress bar and the logs."""

    def __init__(self):
        self.start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is None:
            return
        images = len(batch[0]) * trainer.world_size
        pl_module.log("img_s", images / max(time.perf_counter() - self.start, 1e-9), prog_bar=True,
                      on_step=True, on_epoch=False)
