"""Run-start extras (lightning-hydra-template's `extras`): the composed config as a tree, warnings silenced."""
import warnings

import rich
import rich.syntax
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

FIRST = ("model", "quant", "kd", "data", "optim", "trainer")  # shown first, the other keys after them


def apply_extras(cfg: DictConfig) -> None:
    """What `cfg.extras` asks for (conf/extras): `ignore_warnings`, `print_config`."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config_tree(cfg)


@rank_zero_only
def print_config_tree(cfg: DictConfig) -> rich.tree.Tree:
    """Print every top-level node of `cfg` (hydra's own excluded) as a branch of YAML; returns the tree."""
    tree = rich.tree.Tree("config", style="dim", guide_style="dim")
    keys = [k for k in FIRST if k in cfg] + [k for k in cfg if k not in FIRST and k != "hydra"]
    for key in keys:
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(key, style="dim").add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    return tree
