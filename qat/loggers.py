"""Loggers that keep a run's history across resume: metrics.csv rows and the W&B run id."""
import csv
import os
import secrets
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

WANDB_ID_FILE = "wandb_id"


def _before(row: dict, epoch: float | None, step: float | None) -> bool:
    """True for a stored row logged before the resume point (epoch first, else step)."""
    if epoch is not None and row.get("epoch") not in (None, ""):
        return float(row["epoch"]) < epoch
    if step is not None and row.get("step") not in (None, ""):
        return float(row["step"]) < step
    return True


class ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is kept: on the first save, its rows from
    the resume point on (the epoch of the first new row) are dropped and the new rows appended."""

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        self._trimmed = False

    def save(self) -> None:
        if self.metrics and not self._trimmed:
            self._trim()
        super().save()

    def _trim(self) -> None:
        self._trimmed = True
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
        epochs = [float(m["epoch"]) for m in self.metrics if m.get("epoch") is not None]
        steps = [float(m["step"]) for m in self.metrics if m.get("step") is not None]
        kept = [r for r in rows if _before(r, min(epochs, default=None), min(steps, default=None))]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)
        self.metrics_keys = header


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives resume: every epoch exactly once (see ResumableWriter)."""

    @property
    def experiment(self) -> ResumableWriter:
        if self._experiment is None:
            self._experiment = ResumableWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_logger(save_dir: str, **kwargs) -> WandbLogger:
    """WandbLogger that continues the run dir's W&B run: its id is kept in `<save_dir>/wandb_id`."""
    path = Path(save_dir) / WANDB_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    return WandbLogger(save_dir=save_dir, id=run_id, resume="allow", **kwargs)
