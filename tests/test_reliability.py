"""Runs that never lie: unique run dirs and locks, last.ckpt every epoch, history across resume, failed saves,
one-line errors and the run's status in summary.json (issue 14)."""
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

import qat.run
from qat import errors, runlock
from qat.callbacks import AtomicCheckpointIO, mark_run
from qat.loggers import WANDB_ID_FILE, ResumableCSVLogger, wandb_logger
from qat.validate import check_checkpoint_file, type_problem

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT))
from sweep import finished_runs  # noqa: E402


# --- 1. run dirs that cannot collide, and locks -------------------------------------------------------------------

def test_same_second_runs_get_distinct_dirs(tmp_path, monkeypatch):
    base = str(tmp_path / "train" / "20261202-101010-vit_2_4_32-32")
    first = runlock.unique_dir(base)
    assert runlock.unique_dir(base) == first  # cached: Hydra resolves hydra.run.dir more than once
    monkeypatch.setattr(runlock, "_claimed", {})  # as seen by a second process
    second = runlock.unique_dir(base)
    assert (first, second) == (base, base + "-2") and Path(second).is_dir()


def test_lock_names_the_holder_and_takes_over_a_dead_one(tmp_path):
    lock = runlock.acquire(tmp_path)
    with pytest.raises(runlock.RunDirLocked, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()}"):
        runlock.acquire(tmp_path)
    runlock.release(lock)
    assert not lock.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    assert json.loads(runlock.acquire(tmp_path).read_text())["pid"] == os.getpid()  # stale lock taken over


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now"}))
    with pytest.raises(runlock.RunDirLocked, match="pid 1 on host elsewhere"):
        runlock.acquire(tmp_path)


# --- 3. history across resume ---------------------------------------------------------------------------------------

def csv_rows(path: Path) -> list[tuple]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    rows = (x.split(",") for x in lines[1:])  # ThroughputMonitor's per-step rows have no epoch
    return [(int(r[header.index("epoch")]), r[header.index("val/acc1")]) for r in rows if r[header.index("epoch")]]


def test_csv_history_survives_resume_without_duplicates(tmp_path):
    first = ResumableCSVLogger(save_dir=str(tmp_path), name="", version="")
    for epoch in range(3):
        first.log_metrics({"val/acc1": epoch / 10, "epoch": epoch}, step=epoch)
    first.save()
    resumed = ResumableCSVLogger(save_dir=str(tmp_path), name="", version="")  # resume from the end of epoch 1
    for epoch in (2, 3):
        resumed.log_metrics({"val/acc1": epoch / 10 + 0.5, "epoch": epoch, "val/loss": 1.0}, step=epoch)
    resumed.save()
    rows = csv_rows(tmp_path / "metrics.csv")
    assert rows == [(0, "0.0"), (1, "0.1"), (2, "0.7"), (3, "0.8")]  # epoch 2 replaced, not duplicated
    assert "val/loss" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_wandb_run_id_is_kept_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = wandb_logger(save_dir=str(tmp_path), project="qat", offline=True)
    stored = (tmp_path / WANDB_ID_FILE).read_text().strip()
    again = wandb_logger(save_dir=str(tmp_path), project="qat", offline=True)
    assert first._wandb_init["id"] == again._wandb_init["id"] == stored
    assert again._wandb_init["resume"] == "allow"


# --- 4. failed saves ----------------------------------------------------------------------------------------------

def save_with(monkeypatch, tmp_path, error: BaseException) -> tuple[Path, OSError]:
    path = tmp_path / "best.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # a partial file is written, then the disk is full
        raise error
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError) as info:
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, path)
    return path, info.value


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")])
def test_full_disk_keeps_previous_checkpoint_and_no_tmp(monkeypatch, tmp_path, error):
    if isinstance(error, RuntimeError):  # torch's writer: the ENOSPC is the RuntimeError's context
        error.__context__ = OSError(errno.ENOSPC, "No space left on device")
    path, err = save_with(monkeypatch, tmp_path, error)
    assert torch.load(path)["epoch"] == 1 and not list(tmp_path.glob("*.tmp"))
    line = errors.one_line(err)
    assert line.startswith(f"{path}: No space left on device while saving") and "\n" not in line
    assert errors.report(err) == errors.CRASH  # an environment fault, reported without a traceback


def test_permission_error_on_save_is_bad_input_naming_the_path(monkeypatch, tmp_path):
    path, err = save_with(monkeypatch, tmp_path, PermissionError(errno.EACCES, "Permission denied"))
    assert torch.load(path)["epoch"] == 1 and not list(tmp_path.glob("*.tmp"))
    assert errors.one_line(err).startswith(f"{path}: Permission denied") and errors.is_bad_input(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only dirs")
def test_read_only_dir(tmp_path):
    tmp_path.chmod(0o555)
    with pytest.raises(PermissionError, match=str(tmp_path)):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt")


# --- 5. one-line errors -------------------------------------------------------------------------------------------

def test_exit_codes_tell_bad_input_from_crashes(capsys):
    def bug():
        return len(5)
    try:
        bug()
    except TypeError as e:
        crash = e
    try:
        raise TypeError("quant.modules must be a list")
    except TypeError as e:
        check = e
    assert errors.report(ValueError("optim.lr='abc' is not a number")) == errors.BAD_INPUT
    assert capsys.readouterr().err == "error: optim.lr='abc' is not a number\n"
    assert errors.report(check) == errors.BAD_INPUT
    assert errors.report(crash) == errors.CRASH
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "error: TypeError: object of type 'int' has no len()"


@pytest.mark.parametrize("default,value,problem", [
    (False, "maybe", "is not a boolean"), (42, "abc", "is not an integer"), (30, 2.5, "is not an integer"),
    (1e-3, "abc", "is not a number"), (1e-3, 2, None), ([0.9, 0.99], 3, "is not a list"), (5, True, "is a boolean"),
    ("norm", "foo", None), (None, "x", None)])
def test_type_problem(default, value, problem):
    found = type_problem(default, value)
    assert found == problem if problem is None else problem in found


def test_text_file_as_checkpoint(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=rf"ckpt_path={text} is not a PyTorch checkpoint \(it starts with b'hell'\)"):
        check_checkpoint_file("ckpt_path", str(text))
    good = tmp_path / "good.ckpt"
    torch.save({"a": 1}, good)
    check_checkpoint_file("ckpt_path", str(good))
    good.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        check_checkpoint_file("ckpt_path", str(good))


# --- 6. status in summary.json ------------------------------------------------------------------------------------

def test_failed_run_is_never_finished(tmp_path):
    run = tmp_path / "quickstart"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"name": "quickstart", "finished": True, "status": "finished"}))
    assert "quickstart" in finished_runs(tmp_path)
    mark_run(run, "failed", "error: disk full")
    summary = json.loads((run / "summary.json").read_text())
    assert summary == {"name": "quickstart", "finished": False, "status": "failed", "error": "error: disk full"}
    assert finished_runs(tmp_path) == {}


# --- 2. last.ckpt every epoch, resume after a kill (in-process) ---------------------------------------------------

class BestAtFirstEpoch(Callback):
    """val/acc1 = 1 at epoch 1 and 0 after: best.ckpt stays at epoch 1 (runs before the checkpoint callbacks)."""

    def on_validation_end(self, trainer, pl_module):
        trainer.callback_metrics["val/acc1"] = torch.tensor(1.0 if trainer.current_epoch == 0 else 0.0)


class CtrlCBeforeEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


BUILD_CALLBACKS = qat.run.build_callbacks


def train_with(monkeypatch, cfg, *extra: Callback) -> dict:
    monkeypatch.setattr(qat.run, "build_callbacks",
                        lambda *a, **k: BUILD_CALLBACKS(*a, **k) + [BestAtFirstEpoch(), *extra])
    return qat.run.train(cfg)


def state_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_last_ckpt_every_epoch_and_resume_after_interrupt(make_cfg, monkeypatch):
    four = ["trainer.max_epochs=4", "optim.warmup_epochs=0", "optim.cooldown_epochs=0", "test_after_fit=false"]
    whole = make_cfg(*four, run_name="whole")
    train_with(monkeypatch, whole)
    out = Path(whole.paths.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_epoch"], summary["last_epoch"], summary["status"]) == (1, 4, "finished")
    assert state_of(out / "checkpoints/best.ckpt")["epoch"] == 0 and state_of(out / "checkpoints/last.ckpt")["epoch"] == 3

    cut = make_cfg(*four, run_name="cut")
    with pytest.raises(SystemExit):  # Lightning exits after a KeyboardInterrupt
        train_with(monkeypatch, cut, CtrlCBeforeEpoch(3))
    cut_dir = Path(cut.paths.output_dir)
    assert json.loads((cut_dir / "summary.json").read_text())["status"] == "interrupted"
    assert state_of(cut_dir / "checkpoints/last.ckpt")["epoch"] == 2  # epoch 3 done, though best is epoch 1
    resumed = make_cfg(*four, "resume=auto", run_name="cut")
    train_with(monkeypatch, resumed)
    a, b = state_of(out / "checkpoints/last.ckpt"), state_of(cut_dir / "checkpoints/last.ckpt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert json.loads((cut_dir / "summary.json").read_text())["final_val_acc"] == summary["final_val_acc"]
    epochs = [e for e, acc in csv_rows(cut_dir / "metrics.csv") if acc]
    assert epochs == [0, 1, 2, 3]  # every epoch's validation row exactly once


# --- end to end through train.py ----------------------------------------------------------------------------------

def train_py(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "train.py", *TINY, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


@pytest.mark.slow
def test_two_runs_launched_in_the_same_second_finish_in_distinct_dirs(tmp_path):
    # conf/hydra/default.yaml's run dir with the time fixed, so that the two runs always collide
    same_second = f"hydra.run.dir=${{qat.unique_dir:{tmp_path}/train/20261202-101010-vit_2_4_32-32}}"
    procs = [train_py(same_second, "test_after_fit=false") for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    summaries = sorted(tmp_path.glob("train/*/summary.json"))
    assert [s.parent.name for s in summaries] == ["20261202-101010-vit_2_4_32-32", "20261202-101010-vit_2_4_32-32-2"]
    assert all(json.loads(s.read_text())["finished"] for s in summaries)
    assert not list(tmp_path.rglob(runlock.LOCK_NAME))  # released at exit


@pytest.mark.slow
def test_resume_into_a_locked_dir_names_the_holder(tmp_path):
    lock = runlock.acquire(tmp_path / "run")
    proc = train_py(f"hydra.run.dir={tmp_path}/run", "resume=auto")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: run dir {tmp_path}/run is in use by pid {os.getpid()} on host")
    assert not (tmp_path / "run" / "summary.json").exists() and lock.exists()  # the holder's dir is left alone
