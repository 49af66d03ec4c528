"""Operations: exact resume, kill + resume=auto, 2-process DDP on CPU (gloo), offline W&B."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qat.run import train

ROOT = Path(__file__).resolve().parents[1]

QUICK = ["experiment=quickstart", "data.per_class=8", "data.test_per_class=4", "data.batch_size=16",
         "trainer.enable_progress_bar=false", "optim.warmup_epochs=1", "optim.cooldown_epochs=0"]


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(make_cfg, tmp_path):
    common = [*QUICK, "quant=act2b", "data.aug.mixup=0.8", "data.aug.cutmix=1.0", "data.aug.reprob=0.25"]
    train(make_cfg(*common, "trainer.max_epochs=2", tiny=False, run_name="straight"))
    train(make_cfg(*common, "trainer.max_epochs=1", "optim.epochs=2", tiny=False, run_name="part"))
    part = tmp_path / "part" / "checkpoints" / "last.ckpt"
    train(make_cfg(*common, "trainer.max_epochs=2", f"ckpt_path={part}", tiny=False, run_name="resumed"))
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert any(k.endswith("act_quantizer.step") for k in straight)
    acc = [json.loads((tmp_path / r / "summary.json").read_text())["final_val_acc"] for r in ("straight", "resumed")]
    assert acc[0] == acc[1]


def run_train(args: list[str], env: dict | None = None) -> subprocess.Popen:
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto(tmp_path):
    args = [*QUICK, "data.per_class=40", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}/run",
            f"paths.output_root={tmp_path}", "resume=auto"]
    proc = run_train(args)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert last.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)  # during epoch 2
    proc.wait()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "running"  # never "finished"
    epoch_saved = torch.load(last, weights_only=False)["epoch"]
    assert epoch_saved >= 0  # the checkpoint on disk is complete and loadable
    out, _ = run_train(args).communicate(timeout=600)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_completed"] == 3, out[-3000:]
    assert "continuing from" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_ddp_two_cpu_processes_quantized(tmp_path):
    args = [*QUICK, "trainer=ddp_cpu", "quant=act2b", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/run",
            f"paths.output_root={tmp_path}"]
    out, _ = run_train(args).communicate(timeout=600)
    summaries = list(tmp_path.rglob("summary.json"))
    assert len(summaries) == 1, out[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "quantizer steps identical on all 2 ranks" in log, out[-3000:]
    assert "global batch 16 = 2 device(s) x 8" in log


@pytest.mark.slow
def test_multirun_of_ddp_jobs_with_wandb(tmp_path):
    args = ["-m", *QUICK, "trainer=ddp_cpu", "quant=fp,act2b", "trainer.max_epochs=1", "logger=wandb",
            f"hydra.sweep.dir={tmp_path}/multi", f"paths.output_root={tmp_path}"]
    proc = run_train(args, env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    summaries = list(tmp_path.rglob("summary.json"))
    assert sorted(json.loads(p.read_text())["quant_choice"] for p in summaries) == ["act2b", "fp"]
    assert len({p.parent for p in tmp_path.rglob("offline-run-*/*.wandb")}) == 2  # one W&B run per job


def test_wandb_offline_writes_run_folder(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = make_cfg("logger=wandb", "tags=[mine]")
    try:
        train(cfg)
    finally:
        import wandb
        wandb.finish()
    runs = list(Path(cfg.paths.output_dir).rglob("offline-run-*"))
    assert runs, "no offline W&B run folder"
    # wandb >= 0.19 keeps config and history as protobuf records in the .wandb file until `wandb sync`;
    # its service process may still be writing them after finish() returns
    wanted = [b"lr_scale_rule", b"vit_2_4_32", b"quickstart", b"val/acc1", b"train/loss", b"mine",
              b"best_selected_on"]  # user tag; summary.json values as the run summary
    deadline = time.monotonic() + 60
    while not all(w in (records := next(runs[0].glob("*.wandb")).read_bytes()) for w in wanted):
        if time.monotonic() > deadline:
            raise AssertionError(f"{[w for w in wanted if w not in records]} not in the .wandb records")
        time.sleep(0.5)
