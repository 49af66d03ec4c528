"""Checks of a composed config before any work: value types, ranges, precision on CPU, checkpoint files.

Each problem raises one ValueError naming the key, the bad value and the fix.
"""
import json
import zipfile
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

AT_LEAST_ONE = ("trainer.max_epochs", "data.batch_size", "data.eval_batch_size")
FP16 = ("16", "16-mixed", "16-true", "transformer-engine-float16")
CHECKPOINT_KEYS = ("ckpt_path", "init_from", "kd.teacher.checkpoint")
OWN_CHECK = ("compile",)  # a boolean or 'quantizers': qat.run.check_compile names the choices


def check(cfg: DictConfig, overrides: list[str]) -> None:
    """All checks of this module for the job config `cfg` composed from the command line `overrides`."""
    check_override_types(cfg, overrides)
    check_ranges(cfg)
    check_precision(cfg)
    for key in CHECKPOINT_KEYS:
        check_checkpoint_file(key, OmegaConf.select(cfg, key, default=None))
    if cfg.get("ckpt_path"):
        check_resume_matches(cfg)


def type_problem(default, value) -> str | None:
    """What is wrong with `value` for a key whose config default is `default` (None = fine)."""
    if default is None or value is None or isinstance(default, str):
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "is not a boolean (true or false)"
    if isinstance(value, bool):
        return f"is a boolean; give a {type(default).__name__} like the default {default!r}"
    if isinstance(default, int):
        return None if isinstance(value, int) else f"is not an integer (default {default})"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) else f"is not a number (default {default})"
    if isinstance(default, (list, ListConfig)):
        return None if isinstance(value, (list, ListConfig)) else f"is not a list (default {list(default)})"
    return None


def check_override_types(cfg: DictConfig, overrides: list[str]) -> None:
    """Every `key=value` override has the type of the key's default: use_relu=maybe or lr=abc fail here.

    The defaults come from composing the config again with only the config-group choices of `overrides`.
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = [o.input_line for o in parsed if o.key_or_group in choices]
    values = [o for o in parsed if o.key_or_group not in choices and not o.is_delete() and not o.is_add()]
    if not values:
        return
    defaults = compose(config_name=HydraConfig.get().job.config_name, overrides=groups)
    for o in values:
        key = o.key_or_group
        if key in OWN_CHECK:
            continue
        default = OmegaConf.select(defaults, key, default=None, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        problem = type_problem(default, value)
        if problem:
            example = json.dumps(OmegaConf.to_container(default) if isinstance(default, ListConfig) else default)
            raise ValueError(f"{key}={value!r} {problem}; e.g. {key}={example}")


def check_ranges(cfg: DictConfig) -> None:
    for key in AT_LEAST_ONE:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{key}={value} must be at least 1")
    lr = OmegaConf.select(cfg, "optim.lr", default=None)
    if isinstance(lr, (int, float)) and lr <= 0:
        raise ValueError(f"optim.lr={lr} must be > 0 (e.g. optim.lr=5.5e-4)")


def check_precision(cfg: DictConfig) -> None:
    """float16 needs a GPU: Lightning would switch to bfloat16 with a warning only."""
    import torch
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision in FP16 and on_cpu:
        raise ValueError(f"trainer.precision={precision} (float16) needs a GPU; on CPU use "
                         "trainer.precision=bf16-mixed (bfloat16 autocast) or 32-true")


def check_checkpoint_file(key: str, value) -> None:
    """A checkpoint file given in `key` is a torch file (zip or pickle), not text or a truncated download."""
    if not isinstance(value, str) or ":" in value or value == "auto" or not Path(value).is_file():
        return  # references, run dirs and missing files are resolved (and reported) where they are used
    with open(value, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(value):
            raise ValueError(f"{key}={value} is a truncated or corrupt checkpoint (its zip directory is missing); "
                             "copy it again or give another .ckpt")
    elif not head.startswith(b"\x80"):
        raise ValueError(f"{key}={value} is not a PyTorch checkpoint (it starts with {head!r}); give a .ckpt "
                         "written by train.py or a run directory")


def describe(model: str, quant: dict | None) -> str:
    return f"{model} ({'quantized: ' + str(quant) if quant else 'float'})"


def check_resume_matches(cfg: DictConfig) -> None:
    """ckpt_path=<checkpoint> of another model or quant config fails naming both, before Lightning's key dump."""
    import torch

    from qat.runs import normalize_quant
    path = cfg.ckpt_path
    if not Path(path).is_file():
        return
    stored = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("qat")
    if not stored:
        raise ValueError(f"ckpt_path={path} is not a qat run checkpoint (no 'qat' recipe): resume needs a "
                         "last.ckpt/best.ckpt written by train.py; load weights with init_from= instead")
    theirs = (stored.get("model", {}).get("name"), normalize_quant(stored.get("quant")))
    ours = (cfg.model.name, normalize_quant(cfg.quant))
    if theirs != ours:
        raise ValueError(f"ckpt_path={path} is a checkpoint of {describe(*theirs)}, but this run builds "
                         f"{describe(*ours)}: resume with that run's model=/quant= (its .hydra/overrides.yaml), "
                         f"or start a new run from its weights with init_from={path}")
