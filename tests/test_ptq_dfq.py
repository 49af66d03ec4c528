"""ptq=dfq (CLE + BN-statistics bias correction) through ptq.py: the folded run reloads strictly; bad input.

The analytic steps themselves (folding and CLE preserve the FP function, BN-statistic correction reduces the
expected output error) are tested in tests/test_datafree_analytic.py.
"""
import json
from pathlib import Path

import pytest
import torch

import qat
from qat.checkpoint import init_from
from qat.run import build_student
from qat.runs import load_checkpoint, resolve
from tests.conftest import compose_config
from qat.export.exporter import export
from qat.models import create_model
from qat.ptq import pipeline
from tests.test_datafree_analytic import randomize_bn_
from tests.test_ptq_pipeline import fp_run, ptq  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    """A run dir with a random-weight FP resnet20 (non-trivial BN statistics) in the run checkpoint format."""
    run = tmp_path_factory.mktemp("fp_resnet")
    torch.manual_seed(0)
    model = randomize_bn_(create_model("resnet20"))
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "qat": {"model": {"name": "resnet20"}, "quant": None, "num_classes": 10}},
               run / "checkpoints" / "best.ckpt")
    (run / "summary.json").write_text(json.dumps({"model": "resnet20", "quant": None, "finished": True}))
    return run


def test_dfq_run_reloads_strictly_with_the_same_logits(resnet_run, tmp_path, monkeypatch):
    kept = {}
    quantize_model = pipeline.quantize_model

    def keep(model, *args):
        kept["m"] = model
        return quantize_model(model, *args)
    monkeypatch.setattr(pipeline, "quantize_model", keep)
    summary = ptq(tmp_path, f"ckpt={resnet_run}", "quant=w4a32", "ptq=dfq")
    saved = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=False)["qat"]
    assert saved["fold_bn"] is True
    # every conv fed by ReLU(folded conv): the first block's conv1 (after the stem) and each block's conv2
    blocks = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    assert summary["bias_correction"] == ["layer1.0.conv1"] + [f"{b}.conv2" for b in blocks]
    loaded = qat.load_model(tmp_path)  # strict load of the folded, quantized state dict
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), kept["m"].eval()(x), rtol=0, atol=1e-5)


def test_bn_stats_correction_changes_only_corrected_biases(resnet_run, tmp_path):
    ptq(tmp_path / "off", f"ckpt={resnet_run}", "quant=w4a32", "ptq=dfq", "ptq.bias_correct=false")
    on = ptq(tmp_path / "on", f"ckpt={resnet_run}", "quant=w4a32", "ptq=dfq")
    off_state, on_state = (qat.load_model(tmp_path / k).state_dict() for k in ("off", "on"))
    changed = {k.removesuffix(".bias") for k in on_state if not torch.equal(on_state[k], off_state[k])}
    assert changed == set(on["bias_correction"])


@pytest.mark.parametrize("overrides,match", [
    (["ptq.bias_correct=maybe"], r"ptq.bias_correct='maybe': choose one of \[False, True, 'empirical', 'variance', 'bn_stats'\]"),
    (["ptq.bias_correct=variance"], r"ptq.bias_correct=variance scales .* ptq.granularity='layer' .* ptq.granularity=channel"),
    (["ptq.cle=true"], r"cle: ViTLite has no conv/linear -> ReLU -> conv/linear pair .* or drop ptq.cle"),
    (["ptq=dfq", "ptq.cle=false"], r"ptq.bias_correct=bn_stats: ViTLite has no conv -> BatchNorm pair"),
])
def test_bad_dfq_input_fails_before_work(tmp_path, monkeypatch, overrides, match, request):
    fp_run = request.getfixturevalue("fp_run")
    monkeypatch.setattr(pipeline, "evaluate", lambda *a: pytest.fail("evaluated before the error"))
    with pytest.raises(ValueError, match=match):
        ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a32", *overrides)


def test_dfq_run_exports_equal_to_fake_quant(resnet_run, tmp_path):
    ptq(tmp_path, f"ckpt={resnet_run}", "quant=w4a4", "ptq=dfq")
    report = export(tmp_path, "int", check=16)  # qat.export rebuilds the folded model from the recipe
    assert report["check"]["int"]["top1_agreement"] == 1.0, report["check"]


def test_qat_from_a_dfq_run_builds_a_folded_student_that_loads_every_tensor(resnet_run, tmp_path):
    ptq(tmp_path / "dfq", f"ckpt={resnet_run}", "quant=w4a32", "ptq=dfq")
    cfg = compose_config(["model=resnet20", "quant=w4a32", "quant.add_bias=true", f"init_from={tmp_path / 'dfq'}"],
                         tmp_path)
    path = resolve(cfg.init_from, tmp_path)
    checkpoint = load_checkpoint(path)
    student, recipe = build_student(cfg, checkpoint)
    assert recipe["fold_bn"] is True and not any(isinstance(m, torch.nn.BatchNorm2d) for m in student.modules())
    info = init_from(student, path, checkpoint)
    assert info["missing"] == [] and info["unexpected"] == []
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(x), qat.load_model(tmp_path / "dfq")(x), rtol=0, atol=1e-5)
