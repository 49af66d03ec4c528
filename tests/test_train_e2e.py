"""End to end: compose the real config, train a few batches on the bundled sample, check the run's files."""
import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from qat import load_model
from qat.callbacks import RunSummary
from qat.quant import QuantLinear, kernels, quantizers
from qat.run import train

FAMILIES = {
    "vit": ["model=vit_2_4_32"],
    "cct": ["model=cct_7_3x2_32", "model.name=cct_2_3x2_32"],
    "resnet": ["model=resnet20"],
    "timm": ["model=timm", "model.name=resnet10t"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_dev_run_every_family(make_cfg, family):
    metrics = train(make_cfg(*FAMILIES[family], "quant=w2a2", "trainer.fast_dev_run=true"))
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))


def test_attention_quantized_run_trains_and_initialises_every_quantizer(make_cfg):
    cfg = make_cfg("quant=act2b_attn")
    train(cfg)  # a non-finite loss would raise NonFiniteError
    assert json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())["finished"]
    named = list(quantizers(load_model(Path(cfg.paths.output_dir))))
    assert len(named) == 2 * (4 + 4)  # per block: 4 linear inputs + q, k, v, softmax output
    assert all(q.is_initialized and torch.isfinite(q.step).all() and (q.step > 0).all() for _, q in named)


@pytest.mark.slow
def test_compiled_quantizer_kernels_train_with_kd(make_cfg, monkeypatch):
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_failed", set())
    train(make_cfg("quant=act4b", run_name="teacher"))  # a quantized teacher: its quantizers are compiled too
    metrics = train(make_cfg("trainer.fast_dev_run=true", "quant=act2b_attn", "compile=quantizers",
                             "kd=vit_4b", "kd.teacher.model.name=vit_2_4_32", run_name="student"))
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    assert set(kernels._compiled) == {kernels._fake_quant, kernels._grads} and not kernels._failed


def test_run_without_a_logger_drops_the_lr_monitor(make_cfg):
    cfg = make_cfg("logger=none", "trainer.max_epochs=1")
    train(cfg)  # Lightning's LearningRateMonitor raises on a trainer with no logger
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert summary["finished"] and not (Path(cfg.paths.output_dir) / "metrics.csv").exists()


def test_unknown_compile_mode_lists_the_valid_ones(make_cfg):
    with pytest.raises(ValueError, match=r"compile='fast': use one of \[False, True, 'quantizers'\]"):
        train(make_cfg("compile=fast"))


def test_run_writes_checkpoints_metrics_and_summary(make_cfg):
    cfg = make_cfg("trainer.max_epochs=2")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics.csv", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["finished"] is True
    assert isinstance(summary["train_seconds"], float) and summary["train_seconds"] > 0  # sweep.py collect's wall time
    assert summary["model"] == "vit_2_4_32" and summary["quant"] is None and summary["kd"] == "none"
    assert summary["output_dir"] == str(out) and "trainer.max_epochs=2" in summary["overrides"]
    assert 0 <= summary["final_val_acc"] <= summary["best_val_acc"] <= 100
    assert not list(out.rglob("*.tmp")), "atomic writes leave no temp files"
    assert not load_model(out).training


def test_quantized_checkpoint_weights_take_at_most_2_pow_bits_values(make_cfg):
    cfg = make_cfg("quant=w2a2", "quant.weight.per_channel=true")
    train(cfg)
    model = load_model(Path(cfg.paths.output_dir))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 8  # 2 blocks x (qkv, proj, linear1, linear2)
    with torch.no_grad():
        for layer in layers:
            w = layer.weight_quantizer(layer.weight)
            for row in w:
                assert row.unique().numel() <= 3  # 2-bit signed symmetric: {-1, 0, 1} x step


def test_kd_auto_teacher_is_picked_and_not_saved(make_cfg, tmp_path):
    teacher_cfg = make_cfg(run_name="teacher")
    train(teacher_cfg)
    student_cfg = make_cfg("quant=act2b", "kd=vit_2_4_32", "kd.loss.mse_alpha=2.0", run_name="student")
    train(student_cfg)
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["teacher"]["checkpoint"].startswith(str(tmp_path / "teacher"))
    assert len(summary["teacher"]["sha256"]) == 64
    student_ckpt = torch.load(tmp_path / "student/checkpoints/last.ckpt", weights_only=False)
    assert not [k for k in student_ckpt["state_dict"] if k.startswith("teacher")]
    plain = tmp_path / "teacher/checkpoints/last.ckpt"
    assert (tmp_path / "student/checkpoints/last.ckpt").stat().st_size < 1.05 * plain.stat().st_size


def test_missing_teacher_says_how_to_train_it(make_cfg):
    with pytest.raises(FileNotFoundError, match="python train.py model=vit_2_4_32"):
        train(make_cfg("kd=vit_2_4_32"))


def test_unknown_model_lists_valid_names(make_cfg):
    with pytest.raises(ValueError, match="vit_6_4_32"):
        train(make_cfg("model.name=vit_6_4_33"))


def test_mistyped_override_fails(make_cfg):
    with pytest.raises(ConfigCompositionException):
        make_cfg("optim.learning_rate=0.1")


def test_missing_data_root_explains_layouts(make_cfg, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="download"):
        train(make_cfg("data=cifar10", f"data.root={tmp_path / 'nowhere'}"))


@pytest.mark.slow
def test_kd_chain_fp_then_4bit_then_2bit(make_cfg, tmp_path):
    train(make_cfg(run_name="fp"))
    train(make_cfg("quant=act4b", "kd=vit_2_4_32", f"kd.teacher.checkpoint={tmp_path / 'fp'}", run_name="a4"))
    train(make_cfg("quant=act2b", "kd=vit_2_4_32", "+quant@kd.teacher.quant=act4b", f"kd.teacher.checkpoint={tmp_path / 'a4'}",
                   run_name="a2"))
    a4, a2 = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("a4", "a2"))
    assert a4["teacher"]["quant"] is None and a4["teacher"]["checkpoint"].startswith(str(tmp_path / "fp"))
    assert a2["teacher"]["quant"]["act"]["bits"] == 4 and a2["teacher"]["checkpoint"].startswith(str(tmp_path / "a4"))
    assert a2["quant"]["act"]["bits"] == 2 and a2["finished"]


def test_run_summary_carries_its_wall_time_across_a_resume(tmp_path):
    summary = RunSummary(tmp_path, meta={})
    summary.load_state_dict({"history": [10.0], "seconds": 61.5})
    assert summary.state_dict() == {"history": [10.0], "seconds": 61.5}
    summary.load_state_dict({"history": [10.0]})  # a checkpoint from before the wall time was recorded
    assert summary.seconds == 0.0
