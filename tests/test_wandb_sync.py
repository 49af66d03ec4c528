"""python -m qat.wandb_sync: finds every offline W&B run below outputs/ and runs `wandb sync` on them."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from qat.wandb_sync import main, offline_runs, sync_command


def fake_run(root, run_dir: str, run_id: str, synced: bool = False):
    folder = root / run_dir / "wandb" / f"offline-run-20261202_010203-{run_id}"
    folder.mkdir(parents=True)
    (folder / f"run-{run_id}.wandb").write_bytes(b"\x00")
    if synced:
        (folder / f"run-{run_id}.wandb.synced").touch()
    latest = folder.parent / "latest-run"
    if not latest.exists():
        latest.symlink_to(folder.name)
    return folder


def test_finds_every_offline_run_once_and_skips_synced_ones(tmp_path):
    a = fake_run(tmp_path, "train/20261202-010203-vit_2_4_32-32", "aaa")
    b = fake_run(tmp_path, "multirun/20261202-020000/0-vit_6_4_32-32", "bbb")
    done = fake_run(tmp_path, "train/20261202-030000-resnet20-32", "ccc", synced=True)
    (tmp_path / "train" / "x" / "wandb" / "run-20261202_010203-online").mkdir(parents=True)  # an online run
    assert offline_runs(tmp_path) == sorted([a, b])
    assert offline_runs(tmp_path, include_synced=True) == sorted([a, b, done])
    assert sync_command([a, b], ["-p", "qat"]) == [sys.executable, "-m", "wandb", "sync", "-p", "qat", str(a), str(b)]


def test_print_shows_the_exact_command(tmp_path, capsys):
    a = fake_run(tmp_path, "train/r1", "aaa")
    assert main([str(tmp_path), "--print", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == f"1 offline run(s): wandb sync --dry-run {a}"


def test_nothing_to_sync_is_a_one_line_error(tmp_path, capsys):
    fake_run(tmp_path, "train/r1", "aaa", synced=True)
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no offline W&B runs to sync under" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_offline_run_is_found_and_accepted_by_wandb_sync(tmp_path):
    """A real offline run (no network): wandb's own --dry-run lists it as the run it would upload."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    script = (f"import wandb; r = wandb.init(mode='offline', dir={str(tmp_path / 'train' / 'r1')!r}, project='qat'); "
              "r.log({'val/acc1': 0.5}); r.finish()")
    (tmp_path / "train" / "r1").mkdir(parents=True)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    (run,) = offline_runs(tmp_path)
    done = subprocess.run([sys.executable, "-m", "qat.wandb_sync", str(tmp_path), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Would sync 1 run(s)" in done.stdout + done.stderr and run.name in done.stdout + done.stderr
