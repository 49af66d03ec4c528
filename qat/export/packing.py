"""Packed low-bit weights: b-bit codes as a little-endian bit stream in uint8 bytes, and a size report.

A code is stored as u = level - qmin in [0, 2**b - 1] (1-bit signed: u = 1 for +1, 0 for -1), its b bits
least significant first, codes back to back; 8 // b codes per byte for b in 1, 2, 4, 8, and any b in 1..8.
"""
import numpy as np
import torch
from torch import nn

from qat.quant.integer import live, step_of
from qat.quant import QuantConv2d, QuantLinear, quantizers


def pack_codes(levels: torch.Tensor, bits: int, qmin: int, binary: bool = False) -> torch.Tensor:
    """Integer levels (any shape) -> uint8 tensor of ceil(numel * bits / 8) bytes."""
    u = (levels > 0).to(torch.int64) if binary else levels.to(torch.int64) - qmin
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2 ** bits):
        raise ValueError(f"levels span [{int(u.min()) + qmin}, {int(u.max()) + qmin}]: do not fit {bits} bits "
                         f"from qmin={qmin}")
    flat = u.flatten().numpy().astype(np.uint8)
    bit_planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n, bits), LSB first
    return torch.from_numpy(np.packbits(bit_planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, qmin: int, shape, binary: bool = False) -> torch.Tensor:
    """Inverse of `pack_codes`: int64 levels shaped `shape`."""
    n = int(np.prod(shape))
    bit_planes = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits)
    u = torch.from_numpy((bit_planes.astype(np.int64) << np.arange(bits)).sum(1))
    levels = u * 2 - 1 if binary else u + qmin
    return levels.reshape(tuple(shape))


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _packed_layer(layer: nn.Module) -> dict:
    q = live(layer.weight_quantizer)
    weight = layer.weight.detach()
    entry = {"packed": pack_codes(q.levels(weight), q.bits, q.qmin, q.binary), "bits": q.bits, "qmin": q.qmin,
             "binary": q.binary, "shape": list(weight.shape), "scale": step_of(q),
             "offset": None if q.offset is None else q.offset.detach().float()}
    entry["bytes"] = sum(tensor_bytes(entry[k]) for k in ("packed", "scale", "offset"))
    return entry


@torch.no_grad()
def pack_model(model: nn.Module) -> tuple[dict, dict]:
    """({'layers': {name: packed weight}, 'float': other tensors}, size report) of a fake-quant model.

    Quantized weights become packed codes plus their scales/offsets; everything else (biases, norms,
    embeddings, FP layers, activation steps) is kept as float32 tensors.
    """
    layers = {n: _packed_layer(m) for n, m in model.named_modules()
              if isinstance(m, (QuantLinear, QuantConv2d)) and live(m.weight_quantizer) is not None}
    if not layers:
        raise ValueError("the model has no quantized weights: nothing to pack (use --format onnx for an FP export)")
    skip = {f"{n}.weight" for n in layers} | {f"{n}.weight_quantizer.{k}" for n in layers
                                               for k in ("step", "offset", "initialized")}
    floats = {k: v.detach().float() for k, v in model.state_dict().items() if k not in skip}
    quant_names = {f"{n}.{k}" for n, _ in quantizers(model) for k in ("step", "offset", "initialized")}
    fp_bytes = sum(tensor_bytes(v.float()) for k, v in model.state_dict().items() if k not in quant_names)
    rows = {n: {"bits": e["bits"], "packed_bytes": e["bytes"], "fp_bytes": tensor_bytes(model.get_submodule(n).weight),
                "ratio": tensor_bytes(model.get_submodule(n).weight) / e["bytes"]} for n, e in layers.items()}
    layer_packed, layer_fp = sum(r["packed_bytes"] for r in rows.values()), sum(r["fp_bytes"] for r in rows.values())
    total = layer_packed + sum(tensor_bytes(v) for v in floats.values())
    report = {"layers": rows, "quantized_layers": {"packed_bytes": layer_packed, "fp_bytes": layer_fp,
                                                   "ratio": layer_fp / layer_packed},
              "model": {"packed_bytes": total, "fp_bytes": fp_bytes, "ratio": fp_bytes / total}}
    return {"layers": layers, "float": floats}, report


def unpack_model(packed: dict) -> dict:
    """{layer name: integer levels} from a `pack_model` result (or the loaded .pt)."""
    return {n: unpack_codes(e["packed"], e["bits"], e["qmin"], e["shape"], e["binary"])
            for n, e in packed["layers"].items()}


def format_report(report: dict) -> str:
    """The size report as a short text table."""
    lines = [f"{'layer':48s} {'bits':>4s} {'packed B':>10s} {'fp32 B':>10s} {'ratio':>6s}"]
    for name, r in report["layers"].items():
        lines.append(f"{name:48s} {r['bits']:4d} {r['packed_bytes']:10d} {r['fp_bytes']:10d} {r['ratio']:6.1f}")
    for key in ("quantized_layers", "model"):
        r = report[key]
        lines.append(f"{key + ' total':48s} {'':4s} {r['packed_bytes']:10d} {r['fp_bytes']:10d} {r['ratio']:6.1f}")
    return "\n".join(lines)
