"""LitClassifier metrics: best validation top-1 (MaxMetric) and train top-1 against mixed targets."""
import csv

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
