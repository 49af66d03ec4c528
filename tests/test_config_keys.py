"""The kd split (kd.teacher.*, kd.loss.*), top-level `compile`, and renamed keys failing with their new name."""
import pytest

from qat.builders import build, build_quant
from qat.distill import DistillLoss
from qat.moved_keys import check
from qat.quant import QuantConfig
from tests.conftest import compose_config


@pytest.mark.parametrize("arg, new", [
    ("kd.checkpoint=outputs/train/x", "kd.teacher.checkpoint=outputs/train/x"),
    ("kd.model.name=vit_2_4_32", "kd.teacher.model.name=vit_2_4_32"),
    ("+quant@kd.quant=w4a4", "+quant@kd.teacher.quant=w4a4"),
    ("kd.mse_alpha=2", "kd.loss.mse_alpha=2"),
    ("kd.temperature=4", "kd.loss.temperature=4"),
    ("trainer.compile=quantizers", "compile=quantizers"),
])
def test_renamed_keys_fail_naming_the_new_key(arg, new):
    with pytest.raises(ValueError, match=f"was renamed to .*: write {new.replace('+', '[+]')}$"):
        check(["model=vit_2_4_32", arg])


def test_current_keys_pass():
    check(["kd=vit", "kd.teacher.checkpoint=x", "kd.loss.temperature=2", "compile=true", "+quant@kd.teacher.quant=w4a4",
           "quant=act2b", "-m"])


def test_kd_loss_node_builds_a_distill_loss_with_the_overrides(tmp_path):
    cfg = compose_config(["kd=vit_4b", "kd.loss.temperature=4", "kd.loss.mse_alpha=2", "kd.teacher.checkpoint=x"],
                         tmp_path)
    loss = build(cfg.kd.loss)(student_dim=256, teacher_dim=256)
    assert isinstance(loss, DistillLoss) and loss.temperature == 4.0 and loss.mse_alpha == 2.0
    assert cfg.kd.teacher.checkpoint == "x" and cfg.kd.teacher.model.name == "vit_6_4_32"
    assert build_quant(cfg.kd.teacher.quant) == QuantConfig(act={"bits": 4})
    assert build_quant(cfg.quant) is None and cfg.compile is False
