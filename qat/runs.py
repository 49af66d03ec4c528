"""Run directories and checkpoints: find runs, resolve a reference to a checkpoint file, read any checkpoint.

A reference is a checkpoint file, a run dir (-> checkpoints/best.ckpt or last.ckpt), `experiment:<name>` (the newest
finished run of that experiment under the outputs root), `zoo:<name>` (zoo/<name>/ in this repository) or `auto`
(the finished run of a given model and quant config with the best validation accuracy). Checkpoints are qat run
checkpoints (weights under `model.` plus the 'qat' recipe), plain state_dicts, or dicts holding one under
'state_dict_ema' / 'state_dict' / 'model' (the original project's model_best.pth.tar), `module.` prefixes allowed.
"""
import dataclasses
import functools
import hashlib
import json
import logging
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from qat.builders import build_quant
from qat.models import create_model, list_models

ZOO = Path(__file__).resolve().parents[1] / "zoo"
STATE_KEYS = ("state_dict_ema", "state_dict", "model")  # timm's load_checkpoint prefers the EMA weights
PREFIXES = ("module.", "model.")
SHOWN = 10  # keys listed per kind in a mismatch report

log = logging.getLogger(__name__)


def summaries(root: str | Path, **match) -> list[dict]:
    """Every readable summary.json below `root` whose values equal `match`, newest first; '_path' = the file."""
    found = []
    for path in Path(root).rglob("summary.json") if Path(root).is_dir() else []:
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(summary, dict) and all(summary.get(k) == v for k, v in match.items()):
            found.append({**summary, "_path": path, "_mtime": path.stat().st_mtime})
    return sorted(found, key=lambda s: s["_mtime"], reverse=True)


def zoo_names() -> list[str]:
    return sorted(p.name for p in ZOO.iterdir() if (p / "summary.json").is_file()) if ZOO.is_dir() else []


def checkpoint_file(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run dir -> its checkpoints/<prefer>.ckpt (else best, else last)."""
    path = Path(path)
    if path.is_dir():
        for name in (prefer, "best", "last"):
            if (path / "checkpoints" / f"{name}.ckpt").is_file():
                return path / "checkpoints" / f"{name}.ckpt"
        raise FileNotFoundError(f"run dir {path} has no checkpoints/best.ckpt or checkpoints/last.ckpt (unfinished "
                                "or failed run?)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: give a .ckpt file, a run dir, "
                                "experiment:<name>, zoo:<name> or auto")
    return path


def run_checkpoint(summary: dict, prefer: str = "best") -> Path:
    """The checkpoint a summary names; relative paths (zoo entries) are relative to the summary's dir."""
    named = summary.get(f"{prefer}_ckpt") or summary.get("output_dir") or "."
    return checkpoint_file(summary["_path"].parent / named, prefer)


def resolve(ref: str | Path, output_root: str | Path, prefer: str = "best", model: str | None = None,
            quant=None, hint: str = "") -> Path:
    """The checkpoint file a reference names; `auto` needs `model` (and `quant`) to choose the run."""
    ref = str(ref)
    if ref.startswith("experiment:"):
        name = ref.split(":", 1)[1]
        runs = summaries(output_root, name=name, finished=True)
        if not runs:
            raise FileNotFoundError(f"{ref}: no finished run of experiment {name!r} under {output_root}; "
                                    f"launch it first: python sweep.py run {name}")
        return run_checkpoint(runs[0], prefer)
    if ref.startswith("zoo:"):
        name = ref.split(":", 1)[1]
        if name not in zoo_names():
            raise FileNotFoundError(f"{ref}: no zoo model {name!r}; the zoo ({ZOO}) has: {zoo_names() or 'nothing'}")
        return checkpoint_file(ZOO / name, prefer)
    if ref == "auto":
        run = best_run(output_root, model, quant, hint)
        log.info("auto: %s (best val acc %.2f)", run["_path"].parent, float(run["best_val_acc"]))
        return run_checkpoint(run, prefer)
    return checkpoint_file(ref, prefer)


def model_of(ref, output_root: str | Path = "outputs", default: str = "model") -> str:
    """The model name of the run a reference points to (from its summary.json), for naming new run dirs."""
    try:
        summary = resolve(str(ref), output_root).parent.parent / "summary.json"  # <run>/checkpoints/<file>
        return str(json.loads(summary.read_text()).get("model") or default)
    except (OSError, ValueError, AttributeError):  # a missing reference is reported later, by the command
        return default


def best_run(output_root: str | Path, model: str, quant=None, hint: str = "") -> dict:
    """The finished run of `model` with the same quant config and the highest best_val_acc under `output_root`."""
    wanted = normalize_quant(quant)
    candidates = []
    for summary in summaries(output_root, finished=True, model=model):
        try:
            same = normalize_quant(summary.get("quant")) == wanted
        except (TypeError, ValueError):  # written by an incompatible version: not a candidate
            continue
        if same and summary.get("best_val_acc") is not None:
            candidates.append(summary)
    if not candidates:
        hint = hint or f"python train.py model={model}" + ("" if wanted is None else " quant=<its quant>")
        raise FileNotFoundError(f"auto: no finished {describe_quant(wanted)} {model} run under {output_root} "
                                f"(looked for summary.json files); train it first: {hint}")
    return max(candidates, key=lambda s: float(s["best_val_acc"]))


def normalize_quant(quant) -> dict | None:
    """A quant config as a comparable dict with defaults filled in; None for full precision."""
    config = build_quant(quant)
    return None if config is None else dataclasses.asdict(config)


def describe_quant(quant: dict | None) -> str:
    if quant is None:
        return "full-precision"
    parts = [f"{k} {quant[k]['bits']}b" for k in ("weight", "act", "attn") if quant.get(k)]
    return "quantized (" + ", ".join(parts) + ")"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: str | Path):
    """torch.load on CPU, with a one-line error for a file that is not a torch checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'truncated'}); give a .ckpt written by "
                         "train.py/ptq.py or a state_dict file") from None


def model_state(checkpoint: dict) -> dict:
    """The student's weights of a run checkpoint: its `model.`-prefixed keys, prefix stripped."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def state_of(checkpoint, path: str | Path, target_keys: set[str]) -> dict[str, torch.Tensor]:
    """The weights of any accepted checkpoint, with prefixes shared by all keys stripped to fit `target_keys`."""
    if isinstance(checkpoint, dict) and "qat" in checkpoint:
        return model_state(checkpoint)
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return _strip_prefixes(checkpoint, target_keys)
    for key in STATE_KEYS if isinstance(checkpoint, dict) else ():
        if isinstance(checkpoint.get(key), dict):
            tensors = {k: v for k, v in checkpoint[key].items() if isinstance(v, torch.Tensor)}
            return _strip_prefixes(tensors, target_keys)
    found = sorted(checkpoint)[:20] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(f"checkpoint {path} holds no state_dict (looked for a plain state_dict or the keys "
                     f"{STATE_KEYS}); found: {found}")


def _strip_prefixes(state: dict, target_keys: set[str]) -> dict:
    """Drop 'module.' / 'model.' prefixes shared by every key unless that matches fewer model keys."""
    while True:
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix):]: v for k, v in state.items()}
                if len(stripped.keys() & target_keys) >= len(state.keys() & target_keys):
                    state = stripped
                    break
        else:
            return state


def is_quant_key(key: str) -> bool:
    """State-dict keys of quantizers and learnable input biases."""
    parts = key.split(".")
    return parts[-1] == "input_bias" or any(p.endswith(("_quantizer", "_quant")) for p in parts[:-1])


def _apparent_classes(state: dict) -> int:
    heads = [v.shape[0] for k, v in state.items() if k.endswith(("fc.weight", "head.weight")) and v.ndim == 2]
    return int(heads[-1]) if heads else 10


@functools.lru_cache(maxsize=None)
def _shapes_of(name: str, num_classes: int) -> dict[str, tuple] | None:
    """Key -> shape map of a registered model, built on the meta device (on CPU if that fails); cached."""
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = create_model(name, num_classes=num_classes)
            return {k: tuple(v.shape) for k, v in model.state_dict().items()}
        except (NotImplementedError, RuntimeError, TypeError, ValueError):
            continue
    return None


def guess_models(state: dict) -> str:
    """Registered models whose key -> shape map equals the checkpoint's (quantizer keys ignored), or the closest."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if not is_quant_key(k)}
    classes = _apparent_classes(state)
    exact, scored = [], []
    for name in list_models():
        reference = _shapes_of(name, classes)
        if reference is None:
            continue
        if reference == shapes:
            exact.append(name)
        else:
            same = sum(reference.get(k) == s for k, s in shapes.items())
            scored.append((same / max(len(reference.keys() | shapes.keys()), 1), name))
    if exact:
        return f"{', '.join(exact)} ({classes} classes)"
    score, name = max(scored, default=(0.0, None))
    if not score:
        return "no registered qat model (a timm model or another project's checkpoint?)"
    return f"no exact match; closest is {name} ({100 * score:.0f}% of tensors match)"


def _classifier_mismatch(model: nn.Module, mismatched: list, num_classes: int) -> int | None:
    """The checkpoint's class count if every shape mismatch is in a Linear head with num_classes outputs."""
    found = set()
    for key, saved, wanted in mismatched:
        module = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else None
        if not (isinstance(module, nn.Linear) and module.out_features == num_classes and saved[1:] == wanted[1:]):
            return None
        found.add(saved[0])
    return found.pop() if len(found) == 1 else None


def _listing(title: str, items: list) -> str:
    shown = ", ".join(map(str, items[:SHOWN])) + (", ..." if len(items) > SHOWN else "")
    return f"{len(items)} {title}" + (f": {shown}" if items else "")


def load_state_strict(model: nn.Module, state: dict, source: str, num_classes: int, what: str = "model") -> None:
    """`model.load_state_dict(state, strict=True)` with a readable report of what does not fit."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [(k, tuple(state[k].shape), tuple(target[k].shape))
                  for k in target if k in state and state[k].shape != target[k].shape]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state, strict=True)
        return
    classes = _classifier_mismatch(model, mismatched, num_classes) if mismatched else None
    if classes is not None and not missing and not unexpected:
        raise ValueError(f"{what} was trained with {classes} classes, data has {num_classes} ({source}); "
                         "use one trained on this dataset")
    shapes = [f"{k} {saved} in checkpoint vs {wanted} in model" for k, saved, wanted in mismatched]
    report = (f"{what} checkpoint {source} does not fit {type(model).__name__}: {_listing('missing keys', missing)}; "
              f"{_listing('unexpected keys', unexpected)}; {_listing('shape mismatches', shapes)}. "
              f"The checkpoint looks like: {guess_models(state)}.")
    if missing and all(map(is_quant_key, missing)) and not unexpected:
        report += " Only quantizer state is missing: the checkpoint is full-precision; drop its quant config."
    if unexpected and all(map(is_quant_key, unexpected)) and not missing:
        report += " Only quantizer state is unexpected: the checkpoint is quantized; give its quant config."
    raise ValueError(report)
