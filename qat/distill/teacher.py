"""Teachers for distillation: find the checkpoint, rebuild the (possibly quantized) model, freeze it.

Accepted checkpoints: qat run checkpoints (rebuilt from their recipe), plain state_dicts, and dicts
holding one under 'state_dict' / 'model' / 'state_dict_ema' (the original project's model_best.pth.tar),
with 'module.' / 'model.' prefixes stripped. Quantized teachers: reference §3.9.
"""
import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from qat.checkpoint import build_from_recipe, model_state
from qat.guards import NonFiniteError
from qat.models import create_model, list_models
from qat.quant import QuantConfig, quantize_, quantizers

log = logging.getLogger(__name__)

STATE_KEYS = ("state_dict", "model", "state_dict_ema")
PREFIXES = ("module.", "model.")
SHOWN = 10  # keys listed per kind in a mismatch report


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_teacher_outputs(logits: torch.Tensor, name: str = "teacher") -> None:
    """Raise NonFiniteError if the teacher's logits hold NaN/Inf (check the first batch)."""
    bad = ~torch.isfinite(logits)
    if bad.any():
        raise NonFiniteError(f"{name} produced non-finite logits ({int(bad.sum())} of {logits.numel()} values "
                             "NaN/Inf): check kd.checkpoint and, for a quantized teacher, its quantizer steps")


def quant_config(quant: dict | QuantConfig | None) -> QuantConfig | None:
    """A QuantConfig from a dict (Hydra's '_target_' ignored); None for full precision."""
    if quant is None:
        return None
    if not isinstance(quant, QuantConfig):
        quant = QuantConfig(**{k: v for k, v in dict(quant).items() if k != "_target_"})
    return None if quant.is_fp else quant


def normalize_quant(quant: dict | QuantConfig | None) -> dict | None:
    """A quant config as a comparable dict with defaults filled in; None for full precision."""
    quant = quant_config(quant)
    return None if quant is None else dataclasses.asdict(quant)


def describe_quant(quant: dict | None) -> str:
    if quant is None:
        return "full-precision"
    parts = [f"{k} {quant[k]['bits']}b" for k in ("weight", "act", "attn") if quant.get(k)]
    return "quantized (" + ", ".join(parts) + ")"


def _checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run dir -> <dir>/checkpoints/best.ckpt."""
    path = Path(path)
    if path.is_dir():
        best = path / "checkpoints" / "best.ckpt"
        if not best.is_file():
            raise FileNotFoundError(f"teacher run dir {path} has no checkpoints/best.ckpt (unfinished run?); "
                                    "give kd.checkpoint=<file> or kd.checkpoint=auto")
        return best
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist; set kd.checkpoint to a checkpoint "
                                "file, a run directory, or auto (best finished run under paths.output_root)")
    return path


def resolve_teacher_checkpoint(checkpoint: str, model_name: str, quant: dict | None, outputs_root: str | Path,
                               train_hint: str | None = None) -> tuple[Path, str]:
    """The teacher checkpoint file and a one-line note on where it came from.

    `checkpoint` is a file, a run dir, or 'auto': the finished run under `outputs_root` (by its summary.json)
    with model `model_name`, the same quant config and the highest best_val_acc.
    """
    if str(checkpoint) != "auto":
        path = _checkpoint_file(checkpoint)
        return path, f"kd.checkpoint={path}"
    wanted = normalize_quant(quant)
    candidates = []
    for summary_path in sorted(Path(outputs_root).rglob("summary.json")):
        try:
            summary = json.loads(summary_path.read_text())
            same_quant = normalize_quant(summary.get("quant")) == wanted
        except (OSError, ValueError, TypeError):  # unreadable or from an incompatible version: not a candidate
            continue
        if (summary.get("finished") and summary.get("model") == model_name and same_quant
                and summary.get("best_val_acc") is not None):
            candidates.append((float(summary["best_val_acc"]), summary_path, summary))
    if not candidates:
        hint = train_hint or f"python train.py model={model_name}" + ("" if wanted is None else " quant=<its quant>")
        raise FileNotFoundError(f"kd.checkpoint=auto: no finished {describe_quant(wanted)} {model_name} run under "
                                f"{outputs_root} (looked for summary.json files); train the teacher first: {hint}")
    acc, summary_path, summary = max(candidates, key=lambda c: c[0])
    run_dir = Path(summary.get("output_dir") or summary_path.parent)
    path = Path(summary.get("best_ckpt") or run_dir / "checkpoints" / "best.ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"kd.checkpoint=auto chose {run_dir} (best val acc {acc:.2f}) but {path} is missing")
    note = (f"kd.checkpoint=auto: {describe_quant(wanted)} {model_name} run {run_dir} (best val acc {acc:.2f}, "
            f"best of {len(candidates)} finished run(s))")
    return path, note


def _is_quant_key(key: str) -> bool:
    """State-dict keys of quantizers and learnable input biases."""
    parts = key.split(".")
    return parts[-1] == "input_bias" or any(p.endswith(("_quantizer", "_quant")) for p in parts[:-1])


def _extract_state(checkpoint, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    for key in STATE_KEYS if isinstance(checkpoint, dict) else ():
        if isinstance(checkpoint.get(key), dict):
            return {k: v for k, v in checkpoint[key].items() if isinstance(v, torch.Tensor)}
    found = sorted(checkpoint)[:20] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(f"teacher checkpoint {path} holds no state_dict (looked for a plain state_dict or the keys "
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
    shapes = {k: tuple(v.shape) for k, v in state.items() if not _is_quant_key(k)}
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


def load_state_strict(model: nn.Module, state: dict, source: str, num_classes: int) -> None:
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
        raise ValueError(f"teacher was trained with {classes} classes, data has {num_classes} ({source}); "
                         "use a teacher trained on this dataset")
    shapes = [f"{k} {saved} in checkpoint vs {wanted} in model" for k, saved, wanted in mismatched]
    report = (f"teacher checkpoint {source} does not fit {type(model).__name__}: {_listing('missing keys', missing)}; "
              f"{_listing('unexpected keys', unexpected)}; {_listing('shape mismatches', shapes)}. "
              f"The checkpoint looks like: {guess_models(state)}.")
    if missing and all(map(_is_quant_key, missing)) and not unexpected:
        report += (" Only quantizer state is missing: the checkpoint is full-precision; drop kd.quant or use a "
                   "checkpoint of a quantized run.")
    if unexpected and all(map(_is_quant_key, unexpected)) and not missing:
        report += " Only quantizer state is unexpected: the checkpoint is quantized; set kd.quant to its quant config."
    raise ValueError(report)


def _build_from_run(checkpoint: dict, cfg: dict, quant: dict | None, num_classes: int, path: Path) -> nn.Module:
    """Rebuild a qat run's model from its recipe after checking it is the requested teacher."""
    recipe = checkpoint["qat"]
    name = recipe["model"]["name"]
    if name != cfg["name"]:
        raise ValueError(f"kd.checkpoint={path} is a {name} run, but kd.model.name={cfg['name']!r}: set "
                         f"kd.model.name={name} or choose a {cfg['name']} checkpoint")
    if int(recipe["num_classes"]) != num_classes:
        raise ValueError(f"teacher was trained with {recipe['num_classes']} classes, data has {num_classes} "
                         f"(kd.checkpoint={path})")
    saved, wanted = normalize_quant(recipe.get("quant")), normalize_quant(quant)
    if saved != wanted:
        raise ValueError(f"kd.quant asks for a {describe_quant(wanted)} teacher but kd.checkpoint={path} is a "
                         f"{describe_quant(saved)} run: set kd.quant to the run's quant config")
    ignored = {k: v for k, v in cfg.items() if recipe["model"].get(k, v) != v}
    if ignored:
        log.warning("teacher %s: kd.model settings %s differ from the run's recipe; using the recipe", path, ignored)
    model = build_from_recipe(recipe)
    load_state_strict(model, model_state(checkpoint), str(path), num_classes)
    return model


def load_teacher(model_cfg: dict, checkpoint: str | Path, quant: dict | None = None, *, num_classes: int,
                 device: str | torch.device | None = None) -> nn.Module:
    """Build the teacher, load its weights strictly and freeze it (eval mode, no gradients).

    Args:
        model_cfg: {"name": ..., **model kwargs} as in conf/model ('_target_' ignored).
        checkpoint: a checkpoint file or run dir (see `resolve_teacher_checkpoint` for 'auto').
        quant: the teacher's quant config (reference §3.9 quantized teacher) or None for FP.
        num_classes: classes of the training data; the teacher must predict the same ones.
        device: where to put the teacher (default: stay on CPU).
    """
    cfg = {k: v for k, v in dict(model_cfg).items() if k != "_target_"}
    if "name" not in cfg:
        raise ValueError(f"kd.model={cfg} has no 'name'; give e.g. {{'name': 'vit_6_4_32'}}")
    if cfg.pop("num_classes", num_classes) != num_classes:
        raise ValueError(f"kd.model.num_classes={model_cfg['num_classes']} but the data has {num_classes} classes")
    path = _checkpoint_file(checkpoint)
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(loaded, dict) and "qat" in loaded:
        model = _build_from_run(loaded, cfg, quant, num_classes, path)
    else:
        model = create_model(**cfg, num_classes=num_classes)
        if quant_config(quant) is not None:
            quantize_(model, quant_config(quant))
        state = _strip_prefixes(_extract_state(loaded, path), set(model.state_dict()))
        load_state_strict(model, state, str(path), num_classes)
    pending = [name for name, q in quantizers(model) if not bool(q.initialized)]
    if pending:
        raise RuntimeError(f"quantized teacher {path}: {len(pending)} quantizer(s) were never initialised "
                           f"({', '.join(pending[:SHOWN])}); the checkpoint was saved before any forward pass "
                           "or by a different quant config")
    model.eval().requires_grad_(False)
    log.info("teacher %s (%s) from %s", cfg["name"], describe_quant(normalize_quant(quant)), path)
    return model.to(device) if device is not None else model
