"""Teacher loading: plain / original / run checkpoints, quantized teachers, readable mismatch reports."""
import pytest
import torch

from qat.distill import load_teacher
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
    teacher = load_teacher(VIT2, str(tmp_path / "run" / "checkpoints" / "best.ckpt"), num_classes=10)
    assert torch.equal(logits_of(teacher, x), expected)
    with pytest.raises(ValueError, match=r"is a vit_2_4_32 run, but kd.teacher.model.name='vit_4_4_32'"):
        load_teacher({"name": "vit_4_4_32"}, str(tmp_path / "run" / "checkpoints" / "best.ckpt"), num_classes=10)
    with pytest.raises(ValueError, match="teacher was trained with 10 classes, data has 100"):
        load_teacher(VIT2, str(tmp_path / "run" / "checkpoints" / "best.ckpt"), num_classes=100)
    with pytest.raises(ValueError, match=r"asks for a quantized \(act 4b\) teacher but .* is a full-precision run"):
        load_teacher(VIT2, str(tmp_path / "run" / "checkpoints" / "best.ckpt"), quant=ACT4, num_classes=10)


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
    with pytest.raises(ValueError, match="kd.teacher.model.num_classes=100 but the data has 10 classes"):
        load_teacher({**VIT2, "num_classes": 100}, str(tmp_path / "c100.pth"), num_classes=10)


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
