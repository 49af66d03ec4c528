"""Teacher loading (plain / original / run checkpoints, quantized teachers) and checkpoint auto-resolution."""
import hashlib
import json

import pytest
import torch

from qat.distill import check_teacher_outputs, load_teacher, resolve_teacher_checkpoint, sha256_file
from qat.guards import NonFiniteError
from qat.models import create_model
from qat.quant import QuantConfig, quantize_, quantizers

VIT2 = {"name": "vit_2_4_32"}
ACT4 = {"act": {"bits": 4}}


@pytest.fixture(scope="module")
def vit2():
    torch.manual_seed(0)
    model = create_model("vit_2_4_32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return model, x, model(x)


def logits_of(teacher, x):
    with torch.no_grad():
        return teacher(x)


def test_plain_state_dict_loads_and_is_frozen(vit2, tmp_path):
    model, x, expected = vit2
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    teacher = load_teacher(VIT2, str(tmp_path / "plain.pth"), num_classes=10)
    assert torch.equal(logits_of(teacher, x), expected)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())


def test_original_checkpoint_with_module_prefix_loads(vit2, tmp_path):
    model, x, expected = vit2
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "arch": "vit_2_4_32", "epoch": 300}, tmp_path / "model_best.pth.tar")
    teacher = load_teacher({"_target_": "qat.models.create_model", **VIT2, "num_classes": 10},
                           str(tmp_path / "model_best.pth.tar"), num_classes=10)
    assert torch.equal(logits_of(teacher, x), expected)


def run_checkpoint(model, name="vit_2_4_32", quant=None, num_classes=10) -> dict:
    return {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3,
            "qat": {"model": {"name": name, "num_classes": num_classes}, "quant": quant, "num_classes": num_classes}}


def test_run_checkpoint_and_run_dir_load(vit2, tmp_path):
    model, x, expected = vit2
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(run_checkpoint(model), tmp_path / "run" / "checkpoints" / "best.ckpt")
    teacher = load_teacher(VIT2, str(tmp_path / "run"), num_classes=10)
    assert torch.equal(logits_of(teacher, x), expected)
    with pytest.raises(ValueError, match=r"is a vit_2_4_32 run, but kd.model.name='vit_4_4_32'"):
        load_teacher({"name": "vit_4_4_32"}, str(tmp_path / "run"), num_classes=10)
    with pytest.raises(ValueError, match="teacher was trained with 10 classes, data has 100"):
        load_teacher(VIT2, str(tmp_path / "run"), num_classes=100)
    with pytest.raises(ValueError, match=r"asks for a quantized \(act 4b\) teacher but .* is a full-precision run"):
        load_teacher(VIT2, str(tmp_path / "run"), quant=ACT4, num_classes=10)


def test_wrong_architecture_lists_keys_and_guesses_the_model(vit2, tmp_path):
    torch.save(vit2[0].state_dict(), tmp_path / "vit2.pth")
    with pytest.raises(ValueError) as err:
        load_teacher({"name": "vit_4_4_32"}, str(tmp_path / "vit2.pth"), num_classes=10)
    message = str(err.value)
    assert "22 missing keys: classifier.blocks.2." in message and "0 unexpected keys" in message
    assert "0 shape mismatches" in message
    assert "the checkpoint looks like: vit_2_4_32, vit_2_4_32_sine (10 classes)" in message.lower()


def test_num_classes_mismatch_is_named(tmp_path):
    torch.save(create_model("vit_2_4_32", num_classes=100).state_dict(), tmp_path / "c100.pth")
    with pytest.raises(ValueError, match="teacher was trained with 100 classes, data has 10"):
        load_teacher(VIT2, str(tmp_path / "c100.pth"), num_classes=10)
    with pytest.raises(ValueError, match="kd.model.num_classes=100 but the data has 10 classes"):
        load_teacher({**VIT2, "num_classes": 100}, str(tmp_path / "c100.pth"), num_classes=10)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; set kd.checkpoint"):
        load_teacher(VIT2, str(tmp_path / "nope.pth"), num_classes=10)


def quantized_vit2(x=None):
    torch.manual_seed(0)
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(**ACT4))
    if x is not None:
        with torch.no_grad():
            model.train()(x)  # initialises the activation steps
    return model.eval()


def test_quantized_teacher_loads_strictly(vit2, tmp_path):
    x = vit2[1]
    model = quantized_vit2(x)
    torch.save(model.state_dict(), tmp_path / "q.pth")
    teacher = load_teacher(VIT2, str(tmp_path / "q.pth"), quant=ACT4, num_classes=10)
    assert torch.equal(logits_of(teacher, x), logits_of(model, x))
    assert len(list(quantizers(teacher))) == 8
    torch.save(run_checkpoint(model, quant=ACT4), tmp_path / "q.ckpt")
    teacher = load_teacher(VIT2, str(tmp_path / "q.ckpt"), quant=ACT4, num_classes=10)
    assert torch.equal(logits_of(teacher, x), logits_of(model, x))


def test_quantized_teacher_needs_initialised_quantizers_and_quantizer_state(vit2, tmp_path):
    torch.save(quantized_vit2().state_dict(), tmp_path / "fresh.pth")
    with pytest.raises(RuntimeError, match="8 quantizer.*never initialised"):
        load_teacher(VIT2, str(tmp_path / "fresh.pth"), quant=ACT4, num_classes=10)
    torch.save(vit2[0].state_dict(), tmp_path / "fp.pth")
    with pytest.raises(ValueError, match="Only quantizer state is missing: the checkpoint is full-precision"):
        load_teacher(VIT2, str(tmp_path / "fp.pth"), quant=ACT4, num_classes=10)


def write_run(root, name, model, quant, acc, finished=True):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"ckpt")
    summary = {"model": model, "quant": quant, "best_val_acc": acc, "finished": finished, "output_dir": str(run),
               "best_ckpt": str(run / "checkpoints" / "best.ckpt")}
    (run / "summary.json").write_text(json.dumps(summary))
    return run / "checkpoints" / "best.ckpt"


def test_auto_picks_the_best_finished_matching_run(tmp_path):
    write_run(tmp_path, "a", "vit_2_4_32", None, 50.0)
    best = write_run(tmp_path / "day2", "b", "vit_2_4_32", None, 70.0)
    write_run(tmp_path, "c", "vit_2_4_32", None, 90.0, finished=False)
    write_run(tmp_path, "d", "vit_4_4_32", None, 99.0)
    quantized = write_run(tmp_path, "e", "vit_2_4_32", {"_target_": "qat.quant.QuantConfig", **ACT4}, 95.0)
    write_run(tmp_path, "f", "vit_2_4_32", {"act": {"bits": 2}}, 96.0)
    path, info = resolve_teacher_checkpoint("auto", "vit_2_4_32", None, tmp_path)
    assert path == best and "best val acc 70.00" in info and "best of 2" in info
    path, _ = resolve_teacher_checkpoint("auto", "vit_2_4_32", ACT4, tmp_path)
    assert path == quantized


def test_auto_without_runs_gives_the_train_command(tmp_path):
    write_run(tmp_path, "a", "vit_2_4_32", None, 50.0)
    with pytest.raises(FileNotFoundError, match=r"no finished full-precision vit_6_4_32 run .*"
                                                r"python train.py model=vit_6_4_32$"):
        resolve_teacher_checkpoint("auto", "vit_6_4_32", None, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python train.py model=vit_2_4_32 quant=act4b$"):
        resolve_teacher_checkpoint("auto", "vit_2_4_32", ACT4, tmp_path,
                                   train_hint="python train.py model=vit_2_4_32 quant=act4b")


def test_explicit_checkpoint_and_run_dir(tmp_path):
    best = write_run(tmp_path, "a", "vit_2_4_32", None, 50.0)
    assert resolve_teacher_checkpoint(str(best), "vit_2_4_32", None, tmp_path)[0] == best
    assert resolve_teacher_checkpoint(str(tmp_path / "a"), "vit_2_4_32", None, tmp_path)[0] == best
    with pytest.raises(FileNotFoundError, match="has no checkpoints/best.ckpt"):
        resolve_teacher_checkpoint(str(tmp_path), "vit_2_4_32", None, tmp_path)


def test_sha256_file_and_teacher_output_check(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 3_000_000)
    assert sha256_file(tmp_path / "f", chunk_size=1 << 20) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    check_teacher_outputs(torch.zeros(2, 10))
    with pytest.raises(NonFiniteError, match=r"teacher produced non-finite logits \(1 of 20"):
        check_teacher_outputs(torch.tensor([float("nan")] + [0.0] * 19).view(2, 10))
