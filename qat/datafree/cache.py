"""On-disk cache of synthetic images: uint8 arrays + a JSON sidecar naming the model (sha256) and the settings.

A cache whose sidecar does not match (another model, other settings) is not reused: it is rebuilt, with a log
line saying what differed. Both files are written atomically (`<name>.tmp` then os.replace), images first.
"""
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def sha256_state(model: nn.Module) -> str:
    """sha256 of a model's state_dict values (for models that did not come from a checkpoint file)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_name(method: str, num_images: int, seed: int, settings) -> str:
    """`<method>_n<N>_seed<S>[_<tag>].npz`; the tag hashes the settings that differ from their defaults, so
    variants (e.g. ZeroQ with and without the IntraQ term) keep a file each instead of rebuilding each other's."""
    defaults = type(settings)().as_dict()
    changed = {k: v for k, v in settings.as_dict().items() if v != defaults[k]}
    tag = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8] if changed else ""
    return f"{method}_n{num_images}_seed{seed}" + (f"_{tag}" if tag else "") + ".npz"


def _write_atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _mismatch(saved: dict, wanted: dict) -> list[str]:
    return [f"{k}: {saved.get(k)!r} != {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]


def load_or_build(path: Path, sidecar: dict, build: Callable[[], tuple[np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W, C), int64 labels) from `path` (.npz) if its sidecar equals `sidecar`, else `build()`."""
    path = Path(path)
    meta = path.with_suffix(".json")
    sidecar = json.loads(json.dumps(sidecar))  # tuples -> lists, as they come back from disk
    if path.is_file() and meta.is_file():
        saved = json.loads(meta.read_text())
        differ = _mismatch(saved, sidecar)
        if not differ:
            with np.load(path) as data:
                log.info("synthetic images: reusing cache %s (%d images)", path, len(data["labels"]))
                return data["images"], data["labels"]
        log.warning("synthetic cache %s was made for something else (%s): rebuilding it", path, "; ".join(differ))
    images, labels = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda f: np.savez(f, images=images, labels=labels))
    _write_atomic(meta, lambda f: f.write(json.dumps(sidecar, indent=2, sort_keys=True).encode()))
    log.info("synthetic images: wrote %s (%d images) and its sidecar", path, len(labels))
    return images, labels


def as_labels(y: torch.Tensor) -> np.ndarray:
    return y.detach().cpu().numpy().astype(np.int64)
