"""Run outputs: atomic checkpoints, last.ckpt every epoch, summary.json with the run's status, epoch lines, images/s."""
import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from qat.errors import os_cause

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<name>.tmp`, fsync, then rename: a kill during a save never leaves a corrupt file.

    A failed save (disk full, permission) removes the `.tmp`, leaves the previous file untouched and raises
    one OSError naming the file and the cause (torch buries ENOSPC under a RuntimeError).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            cause = os_cause(err)
            if cause is None:
                raise
            raise OSError(cause.errno, f"{os.strerror(cause.errno)} while saving this checkpoint (the previous "
                                       f"{path.name}, if any, is untouched; {tmp.name} removed)", str(path)) from err


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def mark_run(output_dir: str | Path, status: str, error: str | None = None, facts: dict | None = None) -> None:
    """Set summary.json's "status", "error" and `facts`; "finished" is true only for status "finished".

    Lookups that trust finished runs (kd auto, `experiment:` references, sweep.py) then skip a failed or
    interrupted dir; an interrupted one stays resumable from last.ckpt (resume=auto).
    """
    path = Path(output_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        summary = {}
    summary.update(facts or {}, status=status, finished=status == "finished", error=error)
    write_json_atomic(path, summary)


def saved_epoch(path: str | None) -> int | None:
    """Epochs completed when the checkpoint at `path` was written (its tensors are not read)."""
    if not path or not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["epoch"] + 1


class LastCheckpoint(ModelCheckpoint):
    """`checkpoints/last.ckpt` at the end of every epoch, whatever the validation score.

    Lightning's `save_last` writes last.ckpt only when its top-k checkpoint is saved; this one has no
    monitor. `epoch` is the number of epochs completed when last.ckpt was written (kept in the checkpoint).
    """

    def __init__(self, dirpath: str | Path):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, save_last=False,
                         enable_version_counter=False, auto_insert_metric_name=False)
        self.epoch = 0

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self.epoch = trainer.current_epoch + 1  # before saving: part of the saved state
        super()._save_checkpoint(trainer, filepath)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.epoch = state_dict.get("epoch", 0)


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
        self.seconds = 0.0  # wall time of the epochs run (training + validation), summed across resumes
        self.epoch_start = time.perf_counter()
        self.summary: dict = {}

    def state_dict(self) -> dict:
        return {"history": self.history, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self.seconds = float(state_dict.get("seconds", 0.0))  # checkpoints written before it was recorded: 0

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
        seconds = time.perf_counter() - self.epoch_start
        self.seconds += seconds
        log.info("epoch %d/%d | train/loss %.4f | val/acc1 %s | lr %.3g | %.1fs", trainer.current_epoch + 1,
                 trainer.max_epochs, train_loss, val, lr, seconds)

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        mark_run(self.path.parent, "running", facts=self.meta)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        ckpt = trainer.checkpoint_callback
        last = next((c for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)), None)
        finished = trainer.current_epoch >= trainer.max_epochs and not trainer.interrupted
        best = getattr(ckpt, "best_model_path", None) or None
        last_path = (last.best_model_path or None) if last is not None else None
        self.summary = {
            **self.meta,
            "best_val_acc": max(self.history) if self.history else None,
            "final_val_acc": self.history[-1] if self.history else None,
            "epochs_completed": trainer.current_epoch,
            "train_seconds": round(self.seconds, 1),
            "max_epochs": trainer.max_epochs,
            "status": "finished" if finished else "interrupted",
            "finished": finished,
            "error": None,
            "best_ckpt": best,
            "best_epoch": saved_epoch(best),
            "last_ckpt": last_path,
            "last_epoch": last.epoch if last_path else None,
        }
        write_json_atomic(self.path, self.summary)
        log.info("summary: best val acc %s (epoch %s), final %s -> %s", self.summary["best_val_acc"],
                 self.summary["best_epoch"], self.summary["final_val_acc"], self.path)

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Ctrl-C: "interrupted" (resumable; Lightning then exits); other errors are marked by the entry point."""
        if isinstance(exception, KeyboardInterrupt):
            mark_run(self.path.parent, "interrupted", "KeyboardInterrupt")

    @rank_zero_only
    def on_test_end(self, trainer, pl_module) -> None:
        if self.summary and "test/acc1" in trainer.callback_metrics:
            self.summary["test_acc"] = 100.0 * float(trainer.callback_metrics["test/acc1"])
            write_json_atomic(self.path, self.summary)
