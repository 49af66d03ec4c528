"""Data-free steps of a PTQ run (`ptq.cle`, `ptq.bias_correct=bn_stats`; DFQ, Nagel et al. 2019).

Both fold BatchNorm into the convs first, which changes the model's structure: the run's recipe records it as
`fold_bn: true` and `qat.checkpoint.build_from_recipe` folds the same way before loading the state dict.
"""
from omegaconf import DictConfig
from torch import nn

from qat.datafree.dfq import fold_equalize_
from qat.datafree.equalize import equalizable_links
from qat.datafree.fold import OutputStats, fold_bn_

BIAS_CORRECT = (False, True, "empirical", "variance", "bn_stats")


def folds(ptq: DictConfig) -> bool:
    """Whether the method folds BatchNorm (CLE or BN-statistics bias correction)."""
    return bool(ptq.get("cle", False)) or ptq.bias_correct == "bn_stats"


def check_datafree(model: nn.Module, ptq: DictConfig) -> None:
    """Errors of ptq.cle / ptq.bias_correct on this FP model (a throwaway copy: it is folded)."""
    if ptq.bias_correct not in BIAS_CORRECT:
        raise ValueError(f"ptq.bias_correct={ptq.bias_correct!r}: choose one of {list(BIAS_CORRECT)} "
                         "(true = empirical)")
    if not folds(ptq):
        return
    name = type(model).__name__
    if not fold_bn_(model.eval()) and ptq.bias_correct == "bn_stats":
        raise ValueError(f"ptq.bias_correct=bn_stats: {name} has no conv -> BatchNorm pair to take statistics from; "
                         "use ptq.bias_correct=empirical or false")
    if ptq.get("cle", False) and not equalizable_links(model):
        raise ValueError(f"ptq.cle=true: {name} has no layer pair to equalize (conv/linear -> ReLU -> conv/linear); "
                         "set ptq.cle=false")


def fold_and_equalize_(model: nn.Module, ptq: DictConfig) -> dict[str, OutputStats] | None:
    """Fold BN, then (ptq.cle) equalize and absorb biases, in place; the BN output statistics, None if no folding."""
    if not folds(ptq):
        return None
    cle = bool(ptq.get("cle", False))
    return fold_equalize_(model, cle=cle, bias_absorb=cle)
