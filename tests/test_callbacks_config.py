"""conf/callbacks: Lightning's own callbacks from config; lr of every named group and throughput in metrics.csv."""
import csv

import pytest
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, RichProgressBar, ThroughputMonitor

from qat.builders import build
from qat.run import train
from tests.conftest import compose_config


def test_full_callbacks_build(tmp_path):
    cfg = compose_config(["callbacks=full"], tmp_path)
    built = {name: build(node) for name, node in cfg.callbacks.items()}
    assert isinstance(built["lr_monitor"], LearningRateMonitor) and isinstance(built["throughput"], ThroughputMonitor)
    assert isinstance(built["early_stopping"], EarlyStopping) and isinstance(built["rich_progress_bar"], RichProgressBar)
    assert built["model_checkpoint"].dirpath.endswith("checkpoints")


def test_mistyped_callbacks_list_the_valid_ones(tmp_path):
    with pytest.raises(Exception, match=r"(?s)callbacks/fulll.*default.*early_stopping.*full"):
        compose_config(["callbacks=fulll"], tmp_path)


def test_callbacks_without_a_checkpoint_are_refused(make_cfg):
    with pytest.raises(ValueError, match=r"callbacks=\['lr_monitor'\] has no model_checkpoint"):
        train(make_cfg("callbacks=lr_monitor"))


def test_lr_of_every_named_group_and_throughput_are_logged(make_cfg, tmp_path):
    train(make_cfg("quant=act2b", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                   "callbacks.throughput.window_size=2"))
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"lr-AdamW/decay", "lr-AdamW/no_decay", "lr-AdamW/quant"} <= columns
    assert "train/device/samples_per_sec" in columns
    lrs = [float(r["lr-AdamW/decay"]) for r in rows if r["lr-AdamW/decay"]]
    assert len(lrs) == 2 and all(lr > 0 for lr in lrs)
