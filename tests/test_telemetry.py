"""QuantTelemetry: exact clip/MSE/code/flip numbers, activation hooks only on logged batches, CSV output."""
import csv
import math
import sys
import types
from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat.models import create_model
from qat.module import LitClassifier
from qat.optim import OptimConfig
from qat.quant import (LSQQuantizer, QuantConfig, QuantizationCallback, QuantizerConfig, QuantLinear, quantize_,
                       quantizers)
from qat.telemetry import QuantTelemetry, weight_stats

# w / 0.5 = [-2, -0.25, 0.25, 0.75 | 3, 1, -1, 0]: -2 and 3 clip; levels [-1, 0, 0, 1 | 1, 1, -1, 0]
W = torch.tensor([[-1.0, -0.125, 0.125, 0.375], [1.5, 0.5, -0.5, 0.0]])
W_CLIP = 2 / 8
W_MSE = (0.5**2 + 3 * 0.125**2 + 1.0**2) / 8  # errors -0.5, -0.125, 0.125, -0.125, 1.0, 0, 0, 0
W_CODES = [[0, 1, 1, 2], [2, 2, 0, 1]]  # level - qmin


def ready(q: LSQQuantizer, step, offset=None) -> LSQQuantizer:
    """Set the step (and offset) by hand and mark the quantizer initialised."""
    with torch.no_grad():
        q.step.copy_(torch.tensor(step).view_as(q.step))
        if offset is not None:
            q.offset.copy_(torch.tensor(offset).view_as(q.offset))
        q.initialized.fill_(1)
    return q


def linear(weight_bits=None, act_bits=None) -> QuantLinear:
    cfg = lambda bits: None if bits is None else QuantizerConfig(bits=bits)  # noqa: E731
    layer = QuantLinear.from_float(nn.Linear(4, 2, bias=False), cfg(weight_bits), cfg(act_bits))
    with torch.no_grad():
        layer.weight.copy_(W)
    return layer


class Recorder:
    """A logger that keeps what it is given."""

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


def fake_trainer(step: int, loggers: list, epoch: int = 0):
    return SimpleNamespace(global_step=step, loggers=loggers, is_global_zero=True, current_epoch=epoch)


def test_weight_stats_per_tensor():
    stats = weight_stats(W, ready(LSQQuantizer(2), [0.5]))
    assert stats["clip"].item() == W_CLIP and stats["mse"].item() == W_MSE
    assert stats["codes"].dtype == torch.uint8 and stats["codes"].tolist() == W_CODES


def test_weight_stats_per_channel_with_offset_rounds_ties_to_even():
    # row 1: step 0.5, offset 0 as above; row 2: (w - 0.5) / 1 = [1, 0, -1, -0.5] -> levels [1, 0, -1, 0]
    q = ready(LSQQuantizer(2, per_channel=True, channels=2, learnable_offset=True), [0.5, 1.0], [0.0, 0.5])
    stats = weight_stats(W, q)
    assert stats["clip"].item() == 1 / 8
    assert stats["mse"].item() == (0.5**2 + 3 * 0.125**2 + 0.5**2) / 8  # row 2: only -0.5 -> 0.5 errs
    assert stats["codes"].tolist() == [[0, 1, 1, 2], [2, 1, 0, 1]]


def test_weight_stats_binary():
    # w / 0.5 = [-2, -0.25, 0, 1.5]: |v| > 1 clips twice; sign(0) = +1; outputs -+0.5
    stats = weight_stats(torch.tensor([-1.0, -0.125, 0.0, 0.75]), ready(LSQQuantizer(1), [0.5]))
    assert stats["clip"].item() == 0.5
    assert stats["mse"].item() == (0.5**2 + 0.375**2 + 0.5**2 + 0.25**2) / 4
    assert stats["codes"].tolist() == [0, 0, 2, 2]


def test_flip_fraction_counts_changed_codes_from_the_second_log():
    model = nn.Sequential(linear(weight_bits=2))
    ready(model[0].weight_quantizer, [0.5])
    telemetry = QuantTelemetry(every_n_steps=1)
    first = telemetry.metrics(model, {})
    assert first["quant/0.weight_quantizer/clip"].item() == W_CLIP
    assert first["quant/0.weight_quantizer/mse"].item() == W_MSE
    assert first["quant/0.weight_quantizer/step"].item() == 0.5
    assert "quant/0.weight_quantizer/flip" not in first and "quant/mean_flip" not in first
    with torch.no_grad():  # v: -2 -> 0 and 0 -> 1 change codes; 3 -> 2 still clips to the top level
        model[0].weight[0, 0] = 0.0
        model[0].weight[1, 3] = 0.5
        model[0].weight[1, 0] = 1.0
    second = telemetry.metrics(model, {})
    assert second["quant/0.weight_quantizer/flip"].item() == 2 / 8
    assert second["quant/mean_flip"].item() == 2 / 8 and second["quant/mean_clip_weight"].item() == 1 / 8
    assert telemetry.metrics(model, {})["quant/0.weight_quantizer/flip"].item() == 0


def test_activation_hooks_only_on_the_logged_batch_and_removed_after():
    model = nn.Sequential(linear(act_bits=2))
    q = ready(model[0].act_quantizer, [0.5])
    telemetry, logger = QuantTelemetry(every_n_steps=2), Recorder()
    module = SimpleNamespace(model=model)
    for step in range(3):
        trainer = fake_trainer(step, [logger])
        telemetry.on_train_batch_start(trainer, module, None, step)
        assert len(q._forward_hooks) == (step % 2 == 0)
        model(W)  # the input takes W's values: clip 2/8, MSE as for the weight
        telemetry.on_train_batch_end(trainer, module, None, None, step)
        assert not q._forward_hooks
    assert [step for step, _ in logger.logged] == [0, 2]
    metrics = logger.logged[0][1]
    assert metrics["quant/0.act_quantizer/clip"] == W_CLIP and metrics["quant/0.act_quantizer/mse"] == W_MSE
    assert metrics["quant/mean_clip_act"] == W_CLIP and metrics["quant/0.act_quantizer/step"] == 0.5


def test_histograms_only_with_a_wandb_logger_every_n_epochs(monkeypatch):
    class FakeWandb(WandbLogger):
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, metrics))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Histogram=lambda *a, **kw: (a, kw)))
    model = nn.Sequential(linear(weight_bits=2))
    ready(model[0].weight_quantizer, [0.5])
    telemetry, wandb_logger, csv_like = QuantTelemetry(histograms_every_n_epochs=2), FakeWandb(), Recorder()
    for epoch in range(2):
        telemetry.on_train_epoch_end(fake_trainer(7, [wandb_logger, csv_like], epoch), SimpleNamespace(model=model))
    assert not csv_like.logged and [step for step, _ in wandb_logger.logged] == [7]
    hists = wandb_logger.logged[0][1]
    counts, edges = hists["quant/0.weight_quantizer/codes"][1]["np_histogram"]
    assert counts.tolist() == [2, 3, 3] and edges.tolist() == [-1.5, -0.5, 0.5, 1.5]  # levels -1, 0, 1
    assert hists["quant/0.weight_quantizer/steps"][0][0].tolist() == [0.5]


def test_training_writes_telemetry_to_the_csv(tmp_path):
    torch.manual_seed(0)
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(weight={"bits": 2}, act={"bits": 2},
                                                             attn={"bits": 2}))
    module = LitClassifier(model, OptimConfig(lr=1e-2, epochs=1, warmup_epochs=0, cooldown_epochs=0),
                           recipe={"num_classes": 10})
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    telemetry = QuantTelemetry(every_n_steps=2, histograms_every_n_epochs=1)
    trainer = L.Trainer(max_steps=4, logger=CSVLogger(tmp_path), callbacks=[telemetry, QuantizationCallback()],
                        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=2))
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    names = set(rows[0])
    weight = "quant/classifier.blocks.0.linear1.weight_quantizer"
    act = "quant/classifier.blocks.1.self_attn.attn_quant"
    for name in (f"{weight}/step", f"{weight}/clip", f"{weight}/mse", f"{weight}/flip", f"{act}/step",
                 f"{act}/clip", "quant/mean_clip_act", "quant/mean_clip_weight", "quant/mean_flip"):
        values = {int(r["step"]): float(r[name]) for r in rows if r[name]}
        assert set(values) == ({2} if name.endswith("flip") else {0, 2}), name
        assert all(math.isfinite(v) for v in values.values()), name
    assert len([n for n in names if n.endswith("/step") and n.startswith("quant/")]) == len(list(quantizers(model)))
    assert not any(q._forward_hooks for _, q in quantizers(model))
