"""Which layer feeds which: conv/linear -> [BatchNorm] -> activation -> conv/linear links, from a torch.fx trace.

Attention blocks, quantized layers and quantizers are leaves of the trace (their insides are not traced).
Pass-through modules (Identity, Dropout, DropPath) between the two layers are skipped.
"""
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from qat.models.layers import Attention
from qat.quant import LSQQuantizer, QuantLayerMixin

LAYERS = (nn.Conv2d, nn.Linear)
PASS_THROUGH = (nn.Identity, nn.Dropout, DropPath)
ACTIVATIONS = {nn.ReLU: "relu", F.relu: "relu", torch.relu: "relu", nn.GELU: "gelu", F.gelu: "gelu"}


@dataclass(frozen=True)
class Link:
    """`first` -> [bn] -> `act` -> `second`; `exclusive`: every tensor on the way has only that one consumer."""
    first: str
    act: str
    second: str
    exclusive: bool
    bn: str | None = None


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, (Attention, QuantLayerMixin, LSQQuantizer)) or super().is_leaf_module(m, name)


def trace(model: nn.Module) -> fx.Graph:
    """The fx graph of `model`'s logits forward; a ValueError names the model when it cannot be traced."""
    try:
        return _Tracer().trace(model, concrete_args={"return_features": False})
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...) on dynamic control flow
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx ({e}); data-free transforms "
                         "need a traceable forward") from e


def _kind(node: fx.Node, modules: dict):
    """'layer', 'bn', 'pass', an activation name, or None for anything else."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, LAYERS):
            return "layer"
        if isinstance(m, nn.BatchNorm2d):
            return "bn"
        if isinstance(m, PASS_THROUGH):
            return "pass"
        return ACTIVATIONS.get(type(m))
    if node.op == "call_function":
        return ACTIVATIONS.get(node.target)
    return None


def _walk_up(node: fx.Node, modules: dict):
    """From the input of a layer back to (first layer, bn, act, exclusive), or None if the path is not a link."""
    act, bn, exclusive, seen_act = None, None, True, False
    while True:
        kind = _kind(node, modules)
        if kind == "layer":
            return (node.target, bn, act, exclusive) if seen_act else None
        if kind in ("relu", "gelu") and not seen_act:
            act, seen_act = kind, True
        elif kind == "bn" and seen_act and bn is None:
            bn = node.target
        elif kind != "pass":
            return None
        exclusive = exclusive and len(node.users) == 1
        node = node.args[0]


def find_links(model: nn.Module) -> list[Link]:
    """Every layer whose input is act([bn](layer)) (through pass-through modules), in forward order."""
    graph, modules = trace(model), dict(model.named_modules())
    links = []
    for node in graph.nodes:
        if _kind(node, modules) != "layer" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        found = _walk_up(node.args[0], modules)
        if found:
            first, bn, act, exclusive = found
            links.append(Link(first, act, node.target, exclusive, bn))
    return links


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) for every BatchNorm2d whose input is a Conv2d consumed by that BatchNorm alone."""
    graph, modules = trace(model), dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if _kind(node, modules) == "bn" and isinstance(node.args[0], fx.Node):
            src = node.args[0]
            if src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d) and len(src.users) == 1:
                pairs.append((src.target, node.target))
    return pairs
