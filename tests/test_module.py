"""LitClassifier: best validation top-1 (MaxMetric), train top-1 against mixed targets, erasing after mixing."""
import csv
import random

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from timm.data.random_erasing import RandomErasing
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat.data import build_batch_erasing, build_mixup, train_transform
from qat.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from qat.module import LitClassifier
from qat.optim import OptimConfig

OPTIM = OptimConfig(lr=0.05, epochs=4, warmup_epochs=0, cooldown_epochs=0)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))


def test_val_acc1_best_is_the_running_max_of_val_acc1(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 4, 4, generator=g), torch.randint(0, 10, (32,), generator=g))
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    loader = DataLoader(data, batch_size=8)
    trainer.fit(LitClassifier(toy_model(), OPTIM, {"num_classes": 10}), loader, DataLoader(data, batch_size=32))
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val/acc1"]]
    acc, best = [float(r["val/acc1"]) for r in rows], [float(r["val/acc1_best"]) for r in rows]
    assert len(acc) == 4 and len(set(acc)) > 1
    assert best == [max(acc[:i + 1]) for i in range(4)]


class FixedMix:
    """A mixup stand-in: soft targets whose dominant class is (y + 1) % 10."""

    def __call__(self, x, y):
        targets = torch.full((len(y), 10), 0.01)
        targets[torch.arange(len(y)), y] = 0.4
        targets[torch.arange(len(y)), (y + 1) % 10] = 0.51
        return x, targets


def test_train_acc1_under_mixup_is_measured_against_the_mixed_targets(monkeypatch):
    x, y = torch.eye(4).view(4, 4, 1, 1), torch.arange(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 10, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(10)[:, 1:5])  # logits argmax = y + 1
    logged = {}
    for mixup, expected in ((FixedMix(), 1.0), (None, 0.0)):  # against the unmixed labels the first would be 0
        lit = LitClassifier(model, OPTIM, {"num_classes": 10}, mixup=mixup)
        monkeypatch.setattr(lit, "log", lambda name, value, **kw: logged.__setitem__(name, value))
        lit.training_step((x, y), 0)
        assert logged["train/acc1"].item() == expected


class Recorder(nn.Module):
    """Logits from the mean colour; keeps the batch it was given."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.head(x.mean((2, 3)))


def test_batch_erasing_runs_on_the_mixed_batch_one_pure_noise_box_per_image(monkeypatch):
    random.seed(0)
    torch.manual_seed(0)
    x = torch.arange(1.0, 9.0).mul(100).view(8, 1, 1, 1).expand(8, 3, 32, 32).clone()  # constant images 100..800
    mixup = build_mixup({"mixup": 1.0, "cutmix": 0.0, "smoothing": 0.0}, 10)
    erasing = build_batch_erasing({"reprob": 1.0, "erase_on_batch": True})
    lit = LitClassifier(Recorder(), OPTIM, {"num_classes": 10}, mixup=mixup, erasing=erasing)
    monkeypatch.setattr(lit, "log", lambda *a, **kw: None)
    lit.training_step((x, torch.arange(8)), 0)
    for image in lit.model.seen:
        box = image < 50  # mixed values are >= 100; erased pixels are N(0, 1)
        rows, cols = box[0].any(1).nonzero()[:, 0], box[0].any(0).nonzero()[:, 0]
        assert (box == box[0]).all() and box[0, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one rectangle
        outside, inside = image[~box], image[box]
        assert (outside == outside[0]).all() and outside[0] > 100  # the mix, untouched outside the box
        assert inside.numel() >= 0.02 * 3 * 32 * 32 and abs(inside.mean()) < 0.5 and 0.6 < inside.std() < 1.4


def test_per_sample_erasing_only_without_erase_on_batch():
    def erasers(aug):
        steps = train_transform(32, CIFAR10_MEAN, CIFAR10_STD, aug).transforms
        return [t for t in steps if isinstance(t, RandomErasing)]
    assert len(erasers({"reprob": 0.25})) == 1 and build_batch_erasing({"reprob": 0.25}) is None
    assert not erasers({"reprob": 0.25, "erase_on_batch": True})
    batch = build_batch_erasing({"reprob": 0.25, "erase_on_batch": True})
    assert (batch.probability, batch.mode, batch.max_count) == (0.25, "pixel", 1)
    assert build_batch_erasing({"reprob": 0.0, "erase_on_batch": True}) is None
