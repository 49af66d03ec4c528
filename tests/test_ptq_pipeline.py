"""ptq.py end to end on the bundled sample with a tiny random-weight FP checkpoint; bad input fails before work."""
import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import qat
from bench.ptq_bench import collect
from qat.checkpoint import init_from
from qat.export.exporter import export
from qat.runs import resolve
from qat.distill import load_teacher
from qat.models import create_model
from qat.ptq import pipeline
from qat.quant import QuantConfig, quantize_, quantizers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU

CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = ["data=cifar10_sample", "data.test_per_class=3", "data.eval_batch_size=64", "ptq.calib_size=32",
        "ptq.calib_batch_size=16", "ptq.recon.iters=4", "ptq.recon.batch_size=8", "ptq.awq_grid=2",
        "ptq.max_samples=4096"]


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory) -> Path:
    """A run dir with a random-weight FP vit_2_4_32 in the run checkpoint format."""
    run = tmp_path_factory.mktemp("fp")
    torch.manual_seed(0)
    model = create_model("vit_2_4_32")
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "qat": {"model": {"name": "vit_2_4_32"}, "quant": None, "num_classes": 10}},
               run / "checkpoints" / "best.ckpt")
    (run / "summary.json").write_text(json.dumps({"model": "vit_2_4_32", "quant": None, "finished": True}))
    return run


def ptq(tmp_path: Path, *overrides: str) -> dict:
    """Compose conf/ptq.yaml like `python ptq.py <overrides>` and run it with outputs in tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("ptq", overrides=FAST + list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return pipeline.run(cfg)


METHODS = [("minmax_layer", "w4a32"), ("minmax_channel", "w32a4"), ("mse_layer", "w4a4"), ("mse_channel", "w3a32"),
           ("percentile", "w32a8"), ("aciq_layer", "w4a32"), ("aciq_channel", "w32a8"), ("omse", "w8a32"),
           ("awq", "w4a32"), ("adaround", "w4a4"), ("brecq", "w3a32"), ("qdrop", "w4a4"), ("nwq", "w4a4"),
           ("case2_2", "w4a4"), ("adaqtransform", "w4a4"), ("adaqtransform_nwq", "w2a2")]


@pytest.mark.parametrize("method,quant", METHODS)
def test_every_method_writes_a_loadable_run(fp_run, tmp_path, method, quant):
    summary = ptq(tmp_path, f"ckpt={fp_run}", f"quant={quant}", f"ptq={method}")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["finished"] and saved["model"] == "vit_2_4_32" and saved["quant_acc"] == summary["quant_acc"]
    assert 0 <= saved["fp_acc"] <= 100 and saved["calib_size"] == 32 and saved["quant_mse"]
    assert saved["calib_data"] == "real"
    model = qat.load_model(tmp_path)
    assert all(bool(q.initialized) for _, q in quantizers(model))
    assert pipeline.evaluate(model, _sample_test()) == pytest.approx(summary["quant_acc"])


def test_synthetic_calibration_is_recorded_and_kept_apart_in_the_tables(fp_run, tmp_path):
    synthetic = ["data=synthetic", "data.name=cifar10_sample", "data.root=null", "data.synthetic.num_images=32"]
    real = ptq(tmp_path / "real", f"ckpt={fp_run}", "quant=w4a4", "ptq=minmax_layer")
    noise = ptq(tmp_path / "gaussian", f"ckpt={fp_run}", "quant=w4a4", "ptq=minmax_layer", *synthetic,
                "ptq.test_before_calibration=false")
    assert (real["calib_data"], noise["calib_data"], noise["fp_acc"]) == ("real", "gaussian", None)
    assert real["quant_mse"] != noise["quant_mse"]  # other images, other steps
    table = collect(str(tmp_path))
    assert "| PTQ/minmax_layer |" in table and "| PTQ/minmax_layer [calib: gaussian] |" in table
    assert f"| {real['fp_acc']:.2f} |" in table  # the FP column from the run that evaluated it


def _sample_test():
    from qat.data import CIFARDataModule
    dm = CIFARDataModule("cifar10_sample", test_per_class=3, eval_batch_size=64, num_workers=0)
    dm.setup()
    return dm


def test_bias_corrected_per_channel_run_starts_qat_and_serves_as_teacher(fp_run, tmp_path):
    summary = ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a4", "ptq=mse_channel", "ptq.bias_correct=true")
    assert summary["quant"]["add_bias"] and summary["bias_correction"]
    student = quantize_(create_model("vit_2_4_32"), QuantConfig(**summary["quant"]))
    info = init_from(student, resolve(tmp_path, tmp_path))
    assert info["missing"] == [] and info["unexpected"] == []
    per_tensor = quantize_(create_model("vit_2_4_32"), QuantConfig(**{**summary["quant"], "weight": {
        **summary["quant"]["weight"], "per_channel": False}}))
    with pytest.raises(ValueError, match=r"has per-channel weight steps; use quant.weight.per_channel=true$"):
        init_from(per_tensor, resolve(tmp_path, tmp_path))
    teacher = load_teacher({"name": "vit_2_4_32"}, resolve(tmp_path, tmp_path), quant=summary["quant"], num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), qat.load_model(tmp_path)(x))


def test_asymmetric_inputs_with_lsq_plus_offsets(fp_run, tmp_path):
    ptq(tmp_path, f"ckpt={fp_run}", "quant=w32a4", "ptq=minmax_channel", "quant.act.learnable_offset=true",
        "quant.act.symmetric=false", "quant.act.signed=true")
    model = qat.load_model(tmp_path)
    q = model.classifier.blocks[0].self_attn.qkv.act_quantizer
    assert q.offset is not None and q.offset.shape == (128,) and float(q.offset.detach().abs().max()) > 0
    assert (q.qmin, q.qmax) == (-8, 7)


def test_already_quantized_checkpoint_is_refused(fp_run, tmp_path):
    ptq(tmp_path / "q", f"ckpt={fp_run}", "quant=w8a32")
    with pytest.raises(ValueError, match=r"is already quantized .* PTQ starts from an FP checkpoint"):
        ptq(tmp_path / "again", f"ckpt={tmp_path / 'q'}", "quant=w4a32")


@pytest.mark.parametrize("overrides,error,match", [
    (["ptq.calib_size=5000"], ValueError, r"ptq.calib_size=5000 is larger than the training split \(1000 images"),
    (["ptq.observer.name=kl"], ValueError, r"ptq.observer='kl' .*\['aciq', 'minmax', 'mse', 'omse', 'percentile'\]"),
    (["quant.weight.bits=1"], ValueError, r"quant.weight.bits=1: PTQ supports 2..8 bits"),
    (["quant.weight.bits=9"], ValueError, r"quant.weight.bits=9: PTQ supports 2..8 bits"),
    (["quant=w32a8", "ptq=adaround"], ValueError, r"ptq.recon: vit_2_4_32 has no quantized layer"),
    (["ptq=brecq", "ptq.recon.rounding=round"], ValueError,
     r"ptq.recon.rounding='round': choose one of \['nearest', 'adaround'\]"),
    (["ptq=qdrop", "ptq.recon.learn=[alpha,s_y]"], ValueError, r"ptq.recon.learn=\['alpha', 's_y'\]: unknown \['s_y'\]"),
    (["ptq=nwq", "ptq.recon.objective=ce", "ptq.recon.granularity=block"], ValueError,
     r"ptq.recon.objective=ce needs labels .* ptq.recon.granularity=network"),
    (["ptq=qdrop", "ptq.recon.drop_prob=1.5"], ValueError, r"ptq.recon.drop_prob=1.5: use a probability"),
    (["ptq=adaround", "ptq.recon.rounding=nearest"], ValueError, r"learn alpha exactly when ptq.recon.rounding"),
    (["ptq.recon.rounding=nearest", "ptq.recon.learn=[xi,eta]"], ValueError,
     r"ptq.recon.learn has \['xi', 'eta'\] but ptq.recon.enabled=false: .* ptq.recon.enabled=true"),
    (["quant=fp"], ValueError, r"quant=fp quantizes nothing"),
    (["ptq.recon=adaround"], ValueError, r"ptq.recon='adaround': reconstruction is the ptq.recon.\* group now"),
])
def test_bad_input_fails_before_work(fp_run, tmp_path, monkeypatch, overrides, error, match):
    monkeypatch.setattr(pipeline, "evaluate", lambda *a: pytest.fail("evaluated before the error"))
    with pytest.raises(error, match=match):
        ptq(tmp_path, f"ckpt={fp_run}", "quant=w4a32", *overrides)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("correction", ["true", "variance"])
def test_reconstruction_after_bias_correction_fits_to_the_fp_model(fp_run, tmp_path, monkeypatch, correction):
    """Bias correction changes biases (variance: weights too); reconstruction's targets still come from FP ones."""
    seen = {}
    real = pipeline.reconstruct_

    def spy(model, batches, cfg, reference=None):
        target_source = model if reference is None else reference  # reconstruct_ copies model without one
        seen["reference"] = {k: v.clone() for k, v in target_source.state_dict().items()}
        seen["corrected"] = {k: v.clone() for k, v in model.state_dict().items()}
        return real(model, batches, cfg, reference)
    monkeypatch.setattr(pipeline, "reconstruct_", spy)
    ptq(tmp_path, f"ckpt={fp_run}", "quant=w2a32", "ptq=adaround", "ptq.granularity=channel",
        f"ptq.bias_correct={correction}")
    state = torch.load(fp_run / "checkpoints" / "best.ckpt")["state_dict"]
    fp = {k.removeprefix("model."): v for k, v in state.items()}
    for key, value in fp.items():
        assert torch.equal(seen["reference"][key], value), key
    assert any(not torch.equal(seen["corrected"][k], v) for k, v in fp.items())  # the correction changed something


def test_unknown_zoo_name_lists_the_zoo(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"zoo:nope: no zoo model 'nope'; the zoo .* has"):
        ptq(tmp_path, "ckpt=zoo:nope")


def test_per_channel_ptq_run_exports_equal_to_fake_quant(fp_run, tmp_path):
    ptq(tmp_path / "ptq", f"ckpt={fp_run}", "quant=w4a4", "ptq=mse_channel", "ptq.act_granularity=layer",
        "ptq.bias_correct=variance")  # its scales move the weight steps: still on the integer grid
    report = export(tmp_path / "ptq", "all", check=32)
    for fmt in ("int", "onnx"):
        assert report["check"][fmt]["top1_agreement"] == 1.0, report["check"]
    with pytest.raises(ValueError, match="per-channel activation steps: an integer matmul"):
        ptq(tmp_path / "pc", f"ckpt={fp_run}", "quant=w4a4", "ptq=mse_channel")
        export(tmp_path / "pc", "int", check=0)


def test_adaqtransform_run_is_an_ordinary_quantized_model_and_exports_equal(fp_run, tmp_path):
    plain = ptq(tmp_path / "plain", f"ckpt={fp_run}", "quant=w4a4", "ptq=mse_channel", "ptq.act_granularity=layer",
                "ptq.bias_correct=true")
    summary = ptq(tmp_path / "aqt", f"ckpt={fp_run}", "quant=w4a4", "ptq=adaqtransform")
    assert list(summary["recon"]["learn"]) == ["alpha", "s_x", "xi", "eta"] and summary["quant"]["add_bias"]
    assert list(summary["recon"]["units"]) == ["classifier.blocks.0", "classifier.blocks.1"]  # default: the blocks
    shapes = [{k: v.shape for k, v in qat.load_model(tmp_path / run).state_dict().items()} for run in ("plain", "aqt")]
    assert shapes[0] == shapes[1] and plain["quant"] == summary["quant"]  # xi, eta folded: nothing added
    report = export(tmp_path / "aqt", "all", check=32)
    for fmt in ("int", "onnx"):
        assert report["check"][fmt]["top1_agreement"] == 1.0, report["check"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "quant").glob("w*a*.yaml")))
def test_seed_bit_names_compose_to_their_bits(name):
    w, a = (int(b) for b in re.fullmatch(r"w(\d+)a(\d+)", name).groups())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        quant = compose("ptq", overrides=[f"quant={name}", "ckpt=x"]).quant
    assert (None if quant.weight is None else quant.weight.bits) == (None if w == 32 else w)
    assert (None if quant.act is None else quant.act.bits) == (None if a == 32 else a)
