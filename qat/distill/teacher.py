"""Teachers for distillation: rebuild the (possibly quantized) model from a checkpoint, load it strictly, freeze it.

Finding the checkpoint (run dir, experiment:, zoo:, auto) and reading any checkpoint format is `qat.runs`.
Quantized teachers: reference §3.9.
"""
import logging
from pathlib import Path

import torch
from torch import nn

from qat.builders import as_dict, build_model, build_quant
from qat.checkpoint import build_from_recipe
from qat.quant import quantize_, quantizers
from qat.runs import describe_quant, load_checkpoint, load_state_strict, model_state, normalize_quant, state_of

log = logging.getLogger(__name__)

SHOWN = 10  # quantizer names listed in an error


def _build_from_run(checkpoint: dict, cfg: dict, quant, num_classes: int, path: Path) -> nn.Module:
    """Rebuild a qat run's model from its recipe after checking it is the requested teacher."""
    recipe = checkpoint["qat"]
    name = recipe["model"]["name"]
    if name != cfg["name"]:
        raise ValueError(f"kd.teacher.checkpoint={path} is a {name} run, but kd.teacher.model.name={cfg['name']!r}: "
                         f"set kd.teacher.model.name={name} or choose a {cfg['name']} checkpoint")
    if int(recipe["num_classes"]) != num_classes:
        raise ValueError(f"teacher was trained with {recipe['num_classes']} classes, data has {num_classes} "
                         f"(kd.teacher.checkpoint={path})")
    saved, wanted = normalize_quant(recipe.get("quant")), normalize_quant(quant)
    if saved != wanted:
        raise ValueError(f"kd.teacher.quant asks for a {describe_quant(wanted)} teacher but kd.teacher.checkpoint="
                         f"{path} is a {describe_quant(saved)} run: set kd.teacher.quant to the run's quant config")
    ignored = {k: v for k, v in cfg.items() if k in recipe["model"] and recipe["model"][k] != v}
    if ignored:
        log.warning("teacher %s: kd.teacher.model settings %s differ from the run's recipe; using the recipe", path,
                    ignored)
    model = build_from_recipe(recipe)
    load_state_strict(model, model_state(checkpoint), str(path), num_classes, what="teacher")
    return model


def load_teacher(model_cfg: dict, checkpoint: str | Path, quant=None, *, num_classes: int,
                 device: str | torch.device | None = None) -> nn.Module:
    """Build the teacher, load its weights strictly and freeze it (eval mode, no gradients).

    Args:
        model_cfg: {"name": ..., **model kwargs} as in conf/model.
        checkpoint: a checkpoint file (resolve references with `qat.runs.resolve` first).
        quant: the teacher's quant config (reference §3.9 quantized teacher) or None for FP.
        num_classes: classes of the training data; the teacher must predict the same ones.
        device: where to put the teacher (default: stay on CPU).
    """
    cfg = as_dict(model_cfg)
    if "name" not in cfg:
        raise ValueError(f"kd.teacher.model={cfg} has no 'name'; give e.g. {{'name': 'vit_6_4_32'}}")
    if cfg.setdefault("num_classes", num_classes) != num_classes:
        raise ValueError(f"kd.teacher.model.num_classes={cfg['num_classes']} but the data has {num_classes} classes")
    path = Path(checkpoint)
    loaded = load_checkpoint(path)
    if isinstance(loaded, dict) and "qat" in loaded:
        model = _build_from_run(loaded, cfg, quant, num_classes, path)
    else:
        model = build_model(cfg)
        if build_quant(quant) is not None:
            quantize_(model, build_quant(quant))
        state = state_of(loaded, path, set(model.state_dict()))
        load_state_strict(model, state, str(path), num_classes, what="teacher")
    pending = [name for name, q in quantizers(model) if not bool(q.initialized)]
    if pending:
        raise RuntimeError(f"quantized teacher {path}: {len(pending)} quantizer(s) were never initialised "
                           f"({', '.join(pending[:SHOWN])}); the checkpoint was saved before any forward pass "
                           "or by a different quant config")
    model.eval().requires_grad_(False)
    log.info("teacher %s (%s) from %s", cfg["name"], describe_quant(normalize_quant(quant)), path)
    return model.to(device) if device is not None else model
