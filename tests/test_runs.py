"""qat.runs: finding runs, resolving references (file, run dir, experiment:, zoo:, auto), reading any checkpoint."""
import hashlib
import json

import pytest
import torch

from qat import runs
from qat.checkpoint import init_from
from qat.models import create_model
from qat.quant import QuantConfig, quantize_

ACT4 = {"act": {"bits": 4}}


def write_run(root, name, model, quant, acc, finished=True, run_name=None):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"ckpt")
    summary = {"name": run_name, "model": model, "quant": quant, "best_val_acc": acc, "finished": finished,
               "output_dir": str(run), "best_ckpt": str(run / "checkpoints" / "best.ckpt")}
    (run / "summary.json").write_text(json.dumps(summary))
    return run / "checkpoints" / "best.ckpt"


def test_auto_picks_the_best_finished_matching_run(tmp_path):
    write_run(tmp_path, "a", "vit_2_4_32", None, 50.0)
    best = write_run(tmp_path / "day2", "b", "vit_2_4_32", None, 70.0)
    write_run(tmp_path, "c", "vit_2_4_32", None, 90.0, finished=False)
    write_run(tmp_path, "d", "vit_4_4_32", None, 99.0)
    quantized = write_run(tmp_path, "e", "vit_2_4_32", {"_target_": "qat.quant.QuantConfig", **ACT4}, 95.0)
    write_run(tmp_path, "f", "vit_2_4_32", {"act": {"bits": 2}}, 96.0)
    assert runs.resolve("auto", tmp_path, model="vit_2_4_32") == best
    assert runs.resolve("auto", tmp_path, model="vit_2_4_32", quant=ACT4) == quantized
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    assert len(runs.summaries(tmp_path, finished=True)) == 5


def test_auto_without_runs_gives_the_train_command(tmp_path):
    write_run(tmp_path, "a", "vit_2_4_32", None, 50.0)
    with pytest.raises(FileNotFoundError, match=r"no finished full-precision vit_6_4_32 run .*"
                                                r"python train.py model=vit_6_4_32$"):
        runs.resolve("auto", tmp_path, model="vit_6_4_32")
    with pytest.raises(FileNotFoundError, match=r"quantized \(act 4b\) vit_2_4_32 .*quant=<its quant>$"):
        runs.resolve("auto", tmp_path, model="vit_2_4_32", quant=ACT4)


def test_file_run_dir_and_experiment_references(tmp_path):
    best = write_run(tmp_path, "a", "vit_2_4_32", None, 50.0, run_name="log/1")
    assert runs.resolve(str(best), tmp_path) == best
    assert runs.resolve(tmp_path / "a", tmp_path) == best
    assert runs.resolve("experiment:log/1", tmp_path) == best
    with pytest.raises(FileNotFoundError, match="has no checkpoints/best.ckpt or checkpoints/last.ckpt"):
        runs.resolve(tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist: give a .ckpt file, a run dir"):
        runs.resolve(tmp_path / "nope.ckpt", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no finished run of experiment 'log/2'.*python sweep.py run log/2"):
        runs.resolve("experiment:log/2", tmp_path)


def test_zoo_reference_lists_the_zoo(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "ZOO", tmp_path)
    best = write_run(tmp_path, "resnet20", "resnet20", None, 90.0)
    assert runs.zoo_names() == ["resnet20"] and runs.resolve("zoo:resnet20", "unused") == best
    with pytest.raises(FileNotFoundError, match=r"no zoo model 'vit'; the zoo .* has: \['resnet20'\]"):
        runs.resolve("zoo:vit", "unused")


def test_text_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.ckpt is not a readable torch checkpoint .*give a .ckpt"):
        runs.load_checkpoint(tmp_path / "notes.ckpt")


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 3_000_000)
    assert runs.sha256_file(tmp_path / "f", chunk_size=1 << 20) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_init_from_reads_an_original_checkpoint_with_ema_and_module_prefix(tmp_path):
    torch.manual_seed(0)
    source = create_model("vit_2_4_32")
    noise = {f"module.{k}": torch.randn_like(v) for k, v in source.state_dict().items()}
    ema = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": noise, "state_dict_ema": ema, "epoch": 300}, tmp_path / "model_best.pth.tar")
    student = quantize_(create_model("vit_2_4_32"), QuantConfig(**ACT4))
    info = init_from(student, runs.resolve(tmp_path / "model_best.pth.tar", tmp_path))
    assert all(torch.equal(student.state_dict()[k], v) for k, v in source.state_dict().items())  # the EMA weights
    assert info["unexpected"] == [] and all(runs.is_quant_key(k) for k in info["missing"])
