"""Objects from config nodes: `hydra.utils.instantiate` with the target's own errors, models and quant configs."""
from collections.abc import Mapping

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.models import create_model
from qat.quant import QuantConfig


def build(node, **kwargs):
    """hydra.utils.instantiate, raising the target's own error (e.g. the list of valid model names) unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        raise (e.__cause__ or e) from None


def as_dict(node) -> dict | None:
    """A config node (DictConfig or mapping) as a plain, resolved dict; None stays None."""
    if node is None:
        return None
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def build_model(cfg: Mapping) -> nn.Module:
    """A model from a `conf/model` node (with `_target_`) or a plain {'name': ..., **kwargs} recipe."""
    cfg = as_dict(cfg)
    return build(cfg) if "_target_" in cfg else create_model(**cfg)


def build_quant(cfg) -> QuantConfig | None:
    """A QuantConfig from a `conf/quant` node (with `_target_`), a plain dict or a QuantConfig; None if FP."""
    if cfg is None or isinstance(cfg, QuantConfig):
        config = cfg
    else:
        cfg = as_dict(cfg)
        config = build(cfg, _convert_="all") if "_target_" in cfg else QuantConfig(**cfg)
    return None if config is None or config.is_fp else config
