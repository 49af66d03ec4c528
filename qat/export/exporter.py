"""Export a run checkpoint: validate the request, build every artefact in memory, check it, write atomically.

Files (in the output folder):
    model_int.ts       TorchScript (torch.jit.trace) of the integer model (`qat.export.integer`); torch.jit.load it
    model_int.pt       its plain state dict: int8/uint8 weight codes, scales, offsets, float parts
    model_packed.pt    b-bit weight codes packed into uint8 bytes + float tensors (`qat.export.packing`)
    size_report.json   packed bytes vs FP32 bytes, per quantized layer and whole model
    model.onnx         Q/DQ ONNX graph (`qat.export.onnx_qdq`), input 'input' (B, 3, H, W), output 'logits'
    check.json         exported logits vs the fake-quant model on test images (`qat.export.check`)
"""
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from qat.checkpoint import load_model
from qat.export.check import format_checks, run_checks, test_images
from qat.export.integer import to_integer
from qat.quant.integer import live
from qat.export.onnx_qdq import DEFAULT_OPSET, check_opset, export_onnx, ort_logits, ort_session
from qat.export.packing import format_report, pack_model
from qat.quant import QuantConv2d, QuantLinear, quantizers
from qat.quant.groups import GroupQuantizer
from qat.runs import resolve

FORMATS = ("int", "packed", "onnx", "all")
IMAGE_SHAPE = (3, 32, 32)


def formats_of(fmt: str) -> set[str]:
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r} is not supported; choose one of {list(FORMATS)}")
    return {"int", "packed", "onnx"} if fmt == "all" else {fmt}


def read_model(path: str | Path) -> nn.Module:
    """qat.load_model of a reference (file, run dir, experiment:, zoo:) with a one-line error for a missing,
    foreign or corrupt checkpoint."""
    ckpt = resolve(path, "outputs")
    try:
        return load_model(ckpt)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # torch.load / load_state_dict of a truncated or foreign file
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {ckpt} cannot be read ({type(err).__name__}: {reason}); give a complete .ckpt "
                         "written by a qat run, or its run directory") from None


def check_request(model: nn.Module, formats: set[str], opset: int, int4: bool, source: str) -> None:
    """Refuse what cannot be exported, before any work is done or any file written."""
    found = list(quantizers(model))
    if not found and formats & {"int", "packed"}:
        raise ValueError(f"{source} is a full-precision model (no quantizers): there is nothing to export as integers "
                         f"with --format {'/'.join(sorted(formats & {'int', 'packed'}))}; use --format onnx for an "
                         "FP ONNX export")
    fresh = [n for n, q in found if not q.is_initialized]
    if fresh:
        raise ValueError(f"quantizer {fresh[0]} of {source} is not initialised (step never set): export a trained "
                         "or calibrated checkpoint")
    check_per_tensor_inputs(model, source)
    if "packed" in formats and not has_weight_codes(model):
        raise ValueError(f"{source} quantizes activations only (no weight quantizer): --format packed has no weight "
                         "codes to pack; use --format int or onnx")
    if "onnx" in formats:
        check_opset(model, opset, int4)


def check_per_tensor_inputs(model: nn.Module, source: str) -> None:
    """An integer matmul needs one activation step per input tensor: refuse per-channel / group input quantizers."""
    inputs = [(n, live(m.act_quantizer)) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    per_channel = [(n, q) for n, q in inputs if getattr(q, "per_channel", False)]
    if per_channel:
        name, q = per_channel[0]
        grouped = isinstance(q, GroupQuantizer)
        kind, fix = ("group-wise (quant.n_groups)", "ptq.n_groups=null") if grouped else (
            "per-channel", "ptq.act_granularity=layer")
        raise ValueError(f"layer {name} of {source} has {kind} activation steps: an integer matmul needs one step "
                         "per input tensor (each input channel would need its own rescale inside the sum); re-run "
                         f"PTQ with {fix}, or evaluate it as fake-quant with eval.py")


def has_weight_codes(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantConv2d)) and live(m.weight_quantizer) is not None
               for m in model.modules())


def default_out(path: str | Path) -> Path:
    """<run dir>/export for a run dir or <run dir>/checkpoints/x.ckpt; <folder of the file>/export otherwise."""
    path = Path(path)
    if path.is_dir():
        return path / "export"
    return (path.parent.parent if path.parent.name == "checkpoints" else path.parent) / "export"


def _saved(obj, save=torch.save) -> bytes:
    buffer = io.BytesIO()
    save(obj, buffer)
    return buffer.getvalue()


def build_int(model: nn.Module, example: torch.Tensor) -> tuple[dict, torch.jit.ScriptModule]:
    int_model = to_integer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(int_model, (example,), check_trace=False)
    files = {"model_int.ts": _saved(traced, torch.jit.save), "model_int.pt": _saved(int_model.state_dict())}
    return files, torch.jit.load(io.BytesIO(files["model_int.ts"]))


def build_files(model: nn.Module, formats: set[str], opset: int) -> tuple[dict, dict, dict]:
    """({file name: bytes}, {name: fn(x) of the exported artefact, as reloaded}, size report or {})."""
    example = torch.zeros(2, *IMAGE_SHAPE)
    files, runners, report = {}, {}, {}
    if "int" in formats:
        int_files, loaded = build_int(model, example)
        files.update(int_files)
        runners["int"] = loaded
    if "packed" in formats:
        packed, report = pack_model(model)
        files["model_packed.pt"] = _saved(packed)
        files["size_report.json"] = json.dumps(report, indent=2).encode()
    if "onnx" in formats:
        files["model.onnx"] = export_onnx(model, example[:1], opset)
        session = ort_session(files["model.onnx"])
        runners["onnx"] = lambda x: ort_logits(session, x)
    return files, runners, report


def write_files(out: Path, files: dict) -> list[Path]:
    """Write every file into a temporary folder next to `out`, then move them in; nothing is left on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        out.mkdir(exist_ok=True)
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in files]


def export(path: str | Path, fmt: str = "all", out: str | Path | None = None, check: int = 64,
           data: str = "cifar10_sample", opset: int = DEFAULT_OPSET, int4: bool = False, echo=print) -> dict:
    """Export the run dir / checkpoint `path` in `fmt`; returns {'files': [...], 'check': {...}, 'sizes': {...}}."""
    formats = formats_of(fmt)
    if check < 0:
        raise ValueError(f"--check={check}: give a number of test images >= 0 (0 skips the check)")
    model = read_model(path)
    if fmt == "all" and not has_weight_codes(model) and any(True for _ in quantizers(model)):
        formats.discard("packed")
        echo("activation-only quantization: no weight codes to pack, writing int and onnx")
    check_request(model, formats, opset, int4, str(path))
    images = None
    if check:
        with torch.no_grad():
            num_classes = model(torch.zeros(1, *IMAGE_SHAPE)).shape[1]
        images = test_images(data, check, num_classes)
    files, runners, report = build_files(model, formats, opset)
    result = {"sizes": report}
    if report:
        echo(format_report(report))
    if images is not None:
        result["check"] = run_checks(model, runners, *images) | {"data": data}
        files["check.json"] = json.dumps(result["check"], indent=2).encode()
        echo(format_checks(result["check"]))
    result["files"] = [str(p) for p in write_files(Path(out) if out else default_out(path), files)]
    echo("wrote " + ", ".join(result["files"]))
    return result
