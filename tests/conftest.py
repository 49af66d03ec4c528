"""Shared fixtures: compose the real config (as train.py would) and shrink it for CPU tests."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_JPG = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

# a tiny, fast run on the bundled sample: a few batches, no logger output besides CSV
TINY = ["experiment=quickstart", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2", "data.batch_size=16", "data.eval_batch_size=32",
        "trainer.enable_progress_bar=false"]


def compose_config(overrides: list[str], output_root: Path, run_name: str = "run") -> DictConfig:
    """Compose conf/config.yaml like `python train.py <overrides>` with outputs under `output_root`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_root = str(output_root)
        cfg.paths.output_dir = str(output_root / run_name)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny ops (several times slower with threads on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, tiny: bool = True, run_name: str = "run") -> DictConfig:
        return compose_config((TINY if tiny else []) + list(overrides), tmp_path, run_name)
    return make
