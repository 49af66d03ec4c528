"""Rebuild trained models from run checkpoints (`qat.load_model`) and start runs from them (`init_from`)."""
import json
import logging
from pathlib import Path

import torch
from torch import nn

from qat.models import create_model
from qat.quant import QuantConfig, quantize_, quantizers

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run dir -> its checkpoints/{best,last}.ckpt."""
    path = Path(path)
    if path.is_dir():
        for name in (prefer, "best", "last"):
            candidate = path / "checkpoints" / f"{name}.ckpt"
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"run dir {path} has no checkpoints/best.ckpt or checkpoints/last.ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (give a .ckpt file or a run directory)")
    return path


def read_checkpoint(path: str | Path) -> dict:
    return torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=False)


def model_state(checkpoint: dict) -> dict:
    """The student's weights: `model.`-prefixed keys of a Lightning checkpoint, prefix stripped."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def build_from_recipe(recipe: dict) -> nn.Module:
    """Model + quantization surgery exactly as the run that wrote the recipe."""
    cfg = {k: v for k, v in recipe["model"].items() if k != "_target_"}
    model = create_model(**cfg)
    if recipe.get("quant"):
        quant = QuantConfig(**{k: v for k, v in recipe["quant"].items() if k != "_target_"})
        if not quant.is_fp:
            quantize_(model, quant)
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a trained model (FP or quantized) from a run dir or checkpoint, in eval mode."""
    checkpoint = read_checkpoint(path)
    if "qat" not in checkpoint:
        raise ValueError(f"{path} is not a qat run checkpoint (no 'qat' recipe); plain state_dicts load as "
                         "teachers through kd.model + kd.checkpoint")
    model = build_from_recipe(checkpoint["qat"])
    model.load_state_dict(model_state(checkpoint), strict=True)
    return model.to(map_location).eval()


def init_from(model: nn.Module, path: str | Path) -> dict:
    """Two-step QAT: load matching weights and quantizer steps from another run into `model`.

    Quantizers missing from the checkpoint stay uninitialised and are initialised from the
    loaded weights / the calibration batch. Returns {'missing': [...], 'unexpected': [...]}.
    """
    ckpt_path = resolve_checkpoint(path)
    source = model_state(read_checkpoint(ckpt_path))
    target = model.state_dict()
    mismatched = [k for k, v in source.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"init_from={ckpt_path}: shapes differ for {mismatched[:10]}: is it the same model?")
    result = model.load_state_dict(source, strict=False)
    loaded = len(source) - len(result.unexpected_keys)
    if loaded == 0:
        raise ValueError(f"init_from={ckpt_path}: no parameter matched this model")
    fresh = [n for n, q in quantizers(model) if not bool(q.initialized)]
    log.info("init_from %s: loaded %d tensors; new (not in checkpoint): %s; unexpected (ignored): %s; "
             "quantizers to initialise: %s", ckpt_path, loaded, result.missing_keys or "none",
             result.unexpected_keys or "none", fresh or "none")
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "checkpoint": str(ckpt_path)}


def find_runs(output_root: str | Path) -> list[dict]:
    """Every summary.json below `output_root`, newest first."""
    found = []
    for path in Path(output_root).rglob("summary.json"):
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.append({**summary, "_path": str(path), "_mtime": path.stat().st_mtime})
    return sorted(found, key=lambda s: s["_mtime"], reverse=True)


def resolve_reference(ref: str, output_root: str | Path) -> str:
    """`experiment:<name>` -> the best checkpoint of the newest finished run of that experiment."""
    if not str(ref).startswith("experiment:"):
        return ref
    name = str(ref).split(":", 1)[1]
    for run in find_runs(output_root):
        if run.get("name") == name and run.get("finished"):
            return run.get("best_ckpt") or str(Path(run["output_dir"]) / "checkpoints" / "best.ckpt")
    raise FileNotFoundError(f"{ref}: no finished run of experiment {name!r} under {output_root}; "
                            f"launch it first: python sweep.py run {name}")
