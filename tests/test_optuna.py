"""The documented Optuna search: every trial returns its best validation top-1, so the study runs to the end."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


@pytest.mark.slow
def test_two_trial_search_finishes_and_reports_the_best_validation_accuracy(tmp_path):
    args = ["+hparams_search=lr_wd_mixup", *TINY, "hydra.sweeper.n_trials=2", f"paths.output_root={tmp_path}"]
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "hparams_search" / "lr_wd_mixup").iterdir()
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    best = [json.loads((p / "summary.json").read_text())["best_val_acc"] for p in trials]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(best) / 100)
    assert set(results["best_params"]) == {"optim.lr", "optim.weight_decay", "data.aug.mixup"}
