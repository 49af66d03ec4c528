"""Rebuild trained models from run checkpoints (`qat.load_model`) and start runs from them (`init_from`)."""
import logging
from pathlib import Path

import torch
from torch import nn

from qat.builders import build_model, build_quant
from qat.quant import quantize_, quantizers
from qat.runs import checkpoint_file, load_checkpoint, model_state, state_of

log = logging.getLogger(__name__)


def fold_bn(model: nn.Module) -> nn.Module:
    """BatchNorm folded into the convs (the model of a PTQ run with ptq.cle / bn_stats: recipe `fold_bn`)."""
    from qat.datafree.fold import fold_bn_  # here: qat.datafree imports qat.checkpoint (via qat.distill)
    was_training = model.training
    fold_bn_(model.eval())
    return model.train(was_training)


def folds_bn(checkpoint) -> bool:
    """Whether a loaded run checkpoint holds a BN-folded model (recipe `fold_bn`)."""
    return isinstance(checkpoint, dict) and bool(checkpoint.get("qat", {}).get("fold_bn"))


def build_from_recipe(recipe: dict) -> nn.Module:
    """Model + quantization surgery exactly as the run that wrote the recipe."""
    model = build_model(recipe["model"])
    if recipe.get("fold_bn"):
        fold_bn(model)
    quant = build_quant(recipe.get("quant"))
    return quantize_(model, quant) if quant is not None else model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a trained model (FP or quantized) from a run dir or checkpoint, in eval mode."""
    checkpoint = load_checkpoint(checkpoint_file(path))
    if not isinstance(checkpoint, dict) or "qat" not in checkpoint:
        raise ValueError(f"{path} is not a qat run checkpoint (no 'qat' recipe); a plain state_dict or an original "
                         "checkpoint loads as a teacher (kd.teacher.model + kd.teacher.checkpoint), with init_from, "
                         "or with eval.py model=<its architecture>")
    model = build_from_recipe(checkpoint["qat"])
    model.load_state_dict(model_state(checkpoint), strict=True)
    return model.to(map_location).eval()


def shape_hint(mismatched: list[str], source: dict) -> str:
    """The fix for an init_from shape mismatch: per-channel vs per-tensor weight steps, else another model."""
    if all(k.endswith("weight_quantizer.step") for k in mismatched):
        per_channel = source[mismatched[0]].numel() > 1
        return (f"the checkpoint has {'per-channel' if per_channel else 'per-tensor'} weight steps; "
                f"use quant.weight.per_channel={str(per_channel).lower()}")
    return "is it the same model?"


def init_from(model: nn.Module, path: str | Path, checkpoint=None) -> dict:
    """Two-step QAT: load matching weights and quantizer steps from a checkpoint file into `model`.

    Any checkpoint `qat.runs.state_of` reads works (run, plain, original with `state_dict_ema` / `module.`).
    Quantizers missing from the checkpoint stay uninitialised and are initialised from the loaded weights /
    the calibration batch. `checkpoint`: the file at `path` if already loaded. Returns {'missing': [...],
    'unexpected': [...], 'checkpoint': path}.
    """
    path = Path(path)
    target = model.state_dict()
    source = state_of(load_checkpoint(path) if checkpoint is None else checkpoint, path, set(target))
    mismatched = [k for k, v in source.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"init_from={path}: shapes differ for {mismatched[:10]}: " + shape_hint(mismatched, source))
    result = model.load_state_dict(source, strict=False)
    loaded = len(source) - len(result.unexpected_keys)
    if loaded == 0:
        raise ValueError(f"init_from={path}: no parameter matched this model")
    fresh = [n for n, q in quantizers(model) if not bool(q.initialized)]
    log.info("init_from %s: loaded %d tensors; new (not in checkpoint): %s; unexpected (ignored): %s; "
             "quantizers to initialise: %s", path, loaded, result.missing_keys or "none",
             result.unexpected_keys or "none", fresh or "none")
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "checkpoint": str(path)}
