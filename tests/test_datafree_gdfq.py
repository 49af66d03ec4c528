"""GDFQ: generator range, one data-free QAT step, generator + optimizer in the checkpoint (exact resume)."""
import copy

import pytest
import torch
from torch import nn

from qat.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from qat.datafree.generator import Generator
from qat.datafree.images import pixel_bounds
from qat.distill import DistillLoss
from qat.quant import QuantConfig, calibrate_, quantize_
from qat.run import train
from test_datafree_synthetic import SYNTH, fp_resnet20, module  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generator_outputs_have_the_datasets_shape_and_range():
    gen = Generator(10, 32, CIFAR10_MEAN, CIFAR10_STD, latent_dim=16)
    x, targets = gen.sample(6, 10, boundary_fraction=0.5, g=torch.Generator().manual_seed(0))
    low, high = pixel_bounds(CIFAR10_MEAN, CIFAR10_STD)
    assert x.shape == (6, 3, 32, 32) and (x >= low).all() and (x <= high).all()
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert (targets.max(1).values[:3] < 1).sum() >= 1 and (targets.max(1).values[3:] == 1).all()  # Qimera mixes


def test_one_data_free_step_trains_generator_and_student_not_teacher(fp_resnet20, tmp_path):
    dm = module(fp_resnet20, tmp_path, method="gdfq", num_images=16, gdfq={"latent_dim": 16})
    dm.setup()
    teacher_before = copy.deepcopy(dm.teacher.state_dict())
    gen_before = copy.deepcopy(dm.generator.state_dict())
    x, y = next(iter(dm.train_dataloader()))  # one generator step, then a fresh batch
    assert x.shape == (8, 3, 32, 32) and not x.requires_grad
    assert not states_equal(gen_before, dm.generator.state_dict())
    student = quantize_(copy.deepcopy(dm.teacher).train().requires_grad_(True), QuantConfig(weight={"bits": 4},
                                                                                           act={"bits": 4}))
    calibrate_(student, [x])
    before = copy.deepcopy(student.state_dict())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with torch.no_grad():
        t_logits = dm.teacher(x)
    loss, _ = DistillLoss()(student(x), t_logits, y, nn.CrossEntropyLoss())
    loss.backward()
    opt.step()
    assert not states_equal(before, student.state_dict())
    assert states_equal(teacher_before, dm.teacher.state_dict())


def test_datamodule_state_restores_generator_and_optimizer_bit_exactly(fp_resnet20, tmp_path):
    kwargs = {"method": "gdfq", "num_images": 16, "gdfq": {"latent_dim": 16}}
    a = module(fp_resnet20, tmp_path, **kwargs)
    batches = iter(a.train_dataloader())
    next(batches)
    saved = copy.deepcopy(a.state_dict())
    b = module(fp_resnet20, tmp_path, **kwargs)
    b.load_state_dict(saved)
    xa, _ = a.gdfq_batch(7)
    xb, _ = b.gdfq_batch(7)
    assert torch.equal(xa, xb) and states_equal(a.generator.state_dict(), b.generator.state_dict())


@pytest.mark.slow
def test_resumed_data_free_run_matches_uninterrupted(make_cfg, fp_resnet20, tmp_path):
    common = [s for s in SYNTH if s != "trainer.fast_dev_run=true"] + [
        f"kd.teacher.checkpoint={fp_resnet20}", "data.synthetic.method=gdfq", "data.synthetic.num_images=16",
        "data.batch_size=8", "+data.synthetic.gdfq.latent_dim=16", "optim.warmup_epochs=0", "optim.cooldown_epochs=0"]
    train(make_cfg(*common, "trainer.max_epochs=2", run_name="straight"))
    train(make_cfg(*common, "trainer.max_epochs=1", "optim.epochs=2", run_name="part"))
    part = tmp_path / "part" / "checkpoints" / "last.ckpt"
    train(make_cfg(*common, "trainer.max_epochs=2", f"ckpt_path={part}", run_name="resumed"))
    load = lambda run: torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)  # noqa: E731
    straight, resumed = load("straight"), load("resumed")
    assert states_equal(straight["state_dict"], resumed["state_dict"])
    gen = [c["SyntheticDataModule"]["generator"] for c in (straight, resumed)]
    assert states_equal(*gen)
