"""data=synthetic: the data module, its composition with train.py, and one-line errors on bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_config
from qat.datafree import SyntheticDataModule
from qat.datafree.cache import cache_name
from qat.datafree.zeroq import ZeroQSettings
from qat.models import create_model
from qat.run import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU


def save_run_checkpoint(model: nn.Module, name: str, path: Path) -> Path:
    """`model` in the run checkpoint format (what train.py writes), FP."""
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "qat": {"model": {"name": name}, "quant": None, "num_classes": 10}}, path)
    return path


@pytest.fixture
def fp_resnet20(tmp_path) -> Path:
    """A tiny 'trained' FP resnet20: random weights, BN statistics of smooth random images."""
    torch.manual_seed(0)
    model = create_model("resnet20")
    smooth = nn.functional.interpolate(torch.rand(64, 3, 4, 4) * 3 - 1.5, size=32, mode="bilinear")
    with torch.no_grad():
        model.train()(smooth)
    return save_run_checkpoint(model.eval(), "resnet20", tmp_path / "fp_resnet20.ckpt")


@pytest.fixture
def fp_vit(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_run_checkpoint(create_model("vit_2_4_32").eval(), "vit_2_4_32", tmp_path / "fp_vit.ckpt")


def module(teacher, tmp_path, **synthetic) -> SyntheticDataModule:
    return SyntheticDataModule(synthetic={"teacher": str(teacher), "cache_dir": str(tmp_path / "cache"), **synthetic},
                               name="cifar10_sample", batch_size=8, num_workers=0, test_per_class=2,
                               aug={"mixup": 0.0, "cutmix": 0.0})


def test_gaussian_module_interface(fp_resnet20, tmp_path):
    dm = module(fp_resnet20, tmp_path, num_images=16)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,) and dm.num_classes == 10
    xv, yv = next(iter(dm.val_dataloader()))
    assert len(dm.test_set) == 20 and xv.shape[1:] == (3, 32, 32)  # the real test split
    xc, _ = dm.calibration_batch(4, seed=1)
    assert xc.shape == (4, 3, 32, 32) and torch.equal(xc, dm.calibration_batch(4, seed=1)[0])


def test_zeroq_module_caches_with_the_teachers_sha(fp_resnet20, tmp_path):
    dm = module(fp_resnet20, tmp_path, method="zeroq", num_images=8, zeroq={"iters": 2, "batch_size": 8})
    dm.setup()
    sidecar = json.loads(dm.cache_path.with_suffix(".json").read_text())
    assert sidecar["model_sha256"] == dm.teacher_sha256 and sidecar["iters"] == 2
    assert dm.train_set.images.shape == (8, 32, 32, 3)


def test_zeroq_variants_keep_a_cache_file_each(fp_resnet20, tmp_path):
    base = {"method": "zeroq", "num_images": 8}
    plain = module(fp_resnet20, tmp_path, **base, zeroq={"iters": 1, "batch_size": 8})
    intra = module(fp_resnet20, tmp_path, **base, zeroq={"iters": 1, "batch_size": 8, "intra_weight": 1.0})
    plain.setup(), intra.setup()
    assert plain.cache_path != intra.cache_path and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert cache_name("zeroq", 8, 0, ZeroQSettings()) == "zeroq_n8_seed0.npz"  # the defaults keep the plain name
    again = module(fp_resnet20, tmp_path, **base, zeroq={"iters": 1, "batch_size": 8})
    calls = []
    again.bank = again.bank[0], lambda *a: calls.append(a)  # a rebuild would call it
    again.setup()
    assert not calls and np.array_equal(again.train_set.images, plain.train_set.images)


SYNTH = ["model=resnet20", "data=synthetic", "data.name=cifar10_sample", "data.root=null", "data.num_workers=0",
         "quant=w4a4", "kd=vit", "kd.teacher.model.name=resnet20", "trainer.fast_dev_run=true"]


def test_train_py_runs_data_free_qat_with_kd(make_cfg, fp_resnet20, tmp_path):
    metrics = train(make_cfg(*SYNTH, f"kd.teacher.checkpoint={fp_resnet20}", "data.synthetic.num_images=32",
                             f"data.synthetic.cache_dir={tmp_path / 'cache'}"))
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))


def test_train_py_runs_zeroq_data(make_cfg, fp_resnet20, tmp_path):
    metrics = train(make_cfg(*SYNTH, f"kd.teacher.checkpoint={fp_resnet20}", "data.synthetic.method=zeroq",
                             "data.synthetic.num_images=16", "+data.synthetic.zeroq.iters=1",
                             f"data.synthetic.cache_dir={tmp_path / 'cache'}"))
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    assert len(list((tmp_path / "cache").glob("zeroq_n16_seed42_*.npz"))) == 1  # iters=1: a tagged variant


@pytest.mark.parametrize("synthetic, error, match", [
    ({"method": "zeroq"}, ValueError, r"data.synthetic.method=zeroq needs BatchNorm.*use data.synthetic.method=psaq"),
    ({"num_images": 0}, ValueError, r"data.synthetic.num_images=0: it must be a positive integer"),
    ({"method": "magic"}, ValueError, r"data.synthetic.method='magic' is not valid: use one of \['gaussian', 'zeroq'"),
    ({"zeroq": {"iterations": 3}, "method": "zeroq"}, ValueError,
     r"unknown data.synthetic.zeroq keys \['iterations'\]"),
])
def test_bad_input_fails_in_one_line(fp_vit, tmp_path, synthetic, error, match):
    with pytest.raises(error, match=match) as info:
        module(fp_vit, tmp_path, **synthetic)
    assert "\n" not in str(info.value)


def test_missing_teacher_fails_naming_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.synthetic.teacher=.*nope.ckpt"):
        module(tmp_path / "nope.ckpt", tmp_path)
    with pytest.raises(ValueError, match=r"data.synthetic.teacher is not set.*kd.teacher.checkpoint="):
        SyntheticDataModule(synthetic={"teacher": None}, name="cifar10_sample")


def test_teacher_reference_defaults_to_kd_teacher_or_ptq_ckpt():
    node = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf/data/synthetic.yaml"))
    node = node["synthetic"]["teacher"]  # unresolved: resolved below in a train.py-like and a ptq.py-like config
    for base, wanted in (({"kd": {"teacher": {"checkpoint": "a.ckpt"}}}, "a.ckpt"), ({"ckpt": "zoo:resnet20"},
                                                                                    "zoo:resnet20")):
        assert OmegaConf.create({**base, "t": node}).t == wanted


def test_datafree_qat_rows_share_one_budget_and_differ_only_in_the_images(tmp_path):
    gdfq, real = (compose_config([f"experiment=datafree/resnet20_w4a4_{e}"], tmp_path) for e in ("gdfq", "real"))
    assert gdfq.data._target_ == "qat.datafree.SyntheticDataModule" and gdfq.data.synthetic.method == "gdfq"
    assert gdfq.data.synthetic.teacher == gdfq.kd.teacher.checkpoint == real.kd.teacher.checkpoint == "zoo:resnet20"
    assert real.data._target_ == "qat.data.CIFARDataModule" and real.data.per_class * 10 == gdfq.data.synthetic.num_images
    for key in ("trainer.max_epochs", "data.batch_size", "optim", "quant", "init_from", "kd.loss", "model.name"):
        assert OmegaConf.select(gdfq, key) == OmegaConf.select(real, key), key
    assert real.data.aug.mixup == real.data.aug.cutmix == real.kd.loss.hard_weight == 0  # labels unused by both
