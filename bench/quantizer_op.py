"""Our fused LSQ op vs torch's learnable fake-quant and the textbook autograd LSQ: fwd+bwd time, memory, values.

    python -m bench.quantizer_op               # 128x65x256 activation, 512x256 weight per-tensor/per-channel
    python -m bench.quantizer_op --compile     # also ours as compiled kernels (compile=quantizers) and
                                               # torch.compile'd ours and textbook LSQ

The definitions coincide for zero_point 0, quant_min = Qn, quant_max = Qp and grad_factor = 1/sqrt(Qp*numel),
except that torch's gradients test the range after rounding (round(v) in [Qn, Qp]) and LSQ before
(v in [Qn, Qp]): they differ on the half-bins just outside the range, so gradients are compared on a
tensor with those elements moved out (and the fraction of such elements in the raw tensor is reported).
"""
import math

import torch

from bench.common import (MB, base_parser, interleave, md_table, peak_memory, spread, start, summary, target,
                          targets_table, write_results)
from qat.quant import lsq_fake_quant, lsq_reference

# name: (shape, bits, per_channel); weights are (out, in) like a Linear
CASES = {
    "act 128x65x256 per-tensor": ((128, 65, 256), 2, False),
    "weight 512x256 per-tensor": ((512, 256), 2, False),
    "weight 512x256 per-channel": ((512, 256), 2, True),
}
SMOKE_CASES = {"act 4x9x16 per-tensor": ((4, 9, 16), 2, False), "weight 8x16 per-channel": ((8, 16), 2, True)}
BASE = "torch"


def make_inputs(shape, bits: int, per_channel: bool, device: str, seed: int = 0) -> dict:
    """x ~ N(0, 1), LSQ-initialised step(s), zero zero-points and an upstream gradient, all on `device`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device)
    qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    rows = x.flatten(1) if per_channel else x.reshape(1, -1)
    step = 2 * rows.abs().mean(1) / math.sqrt(qmax)  # (C,) or (1,)
    return {"x": x.requires_grad_(), "step": step.requires_grad_(), "zero_point": torch.zeros_like(step),
            "grad": torch.randn(shape, generator=gen).to(device), "qmin": qmin, "qmax": qmax,
            "per_channel": per_channel, "grad_factor": 1.0 / math.sqrt(qmax * x.numel())}


def broadcast_step(a: dict) -> torch.Tensor:
    """The step as our quantizers hold it: (1,) per tensor, (C, 1, ..., 1) per channel."""
    return a["step"].view(-1, *[1] * (a["x"].ndim - 1)) if a["per_channel"] else a["step"]


def variants(compile_too: bool) -> dict:
    """name -> f(inputs) returning the fake-quantized tensor."""
    def ours(a):
        return lsq_fake_quant(a["x"], broadcast_step(a), a["qmin"], a["qmax"])

    def reference(a):
        return lsq_reference(a["x"], broadcast_step(a), a["qmin"], a["qmax"])

    def torch_op(a):
        if a["per_channel"]:
            return torch._fake_quantize_learnable_per_channel_affine(
                a["x"], a["step"], a["zero_point"], 0, a["qmin"], a["qmax"], a["grad_factor"])
        return torch._fake_quantize_learnable_per_tensor_affine(
            a["x"], a["step"], a["zero_point"], a["qmin"], a["qmax"], a["grad_factor"])
    fns = {BASE: torch_op, "ours": ours, "reference": reference}
    def ours_kernels(a):
        return lsq_fake_quant(a["x"], broadcast_step(a), a["qmin"], a["qmax"], compiled=True)
    if compile_too:
        fns["ours+kernels"] = ours_kernels
        fns["ours+compile"] = torch.compile(ours)
        fns["reference+compile"] = torch.compile(reference)
    return fns


def fwd_bwd(fn, a: dict):
    def run():
        fn(a).backward(a["grad"])
        a["x"].grad = a["step"].grad = None
    return run


def saved_bytes(fn, a: dict) -> int:
    """Bytes autograd keeps for backward beyond the inputs x, step and zero_point themselves."""
    inputs = {a[k].untyped_storage().data_ptr() for k in ("x", "step", "zero_point")}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in inputs:
            storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(a)
    return sum(storages.values())


def compare(fns: dict, case, device: str) -> dict:
    """Max |difference| to torch's op (values) and to the textbook LSQ (values and gradients)."""
    a = make_inputs(*case, device)
    step = broadcast_step(a).detach()
    v = (a["x"] / step).detach()
    half_bins = ((v > a["qmax"]) & (v < a["qmax"] + 0.5)) | ((v < a["qmin"]) & (v > a["qmin"] - 0.5))
    out = {"half_bin_fraction": half_bins.float().mean().item()}
    with torch.no_grad():  # move the half-bin elements one step further out: then the gradients coincide
        a["x"].copy_(torch.where(half_bins, a["x"] + torch.sign(v) * step, a["x"]))

    def grads(fn):
        y = fn(a)
        y.backward(a["grad"])
        res = y.detach(), a["x"].grad, a["step"].grad
        a["x"].grad = a["step"].grad = None
        return res
    ref = {name: grads(fns[name]) for name in (BASE, "reference")}
    for name in (n for n in fns if n != BASE):
        y, dx, ds = grads(fns[name])
        for other, (y0, dx0, ds0) in ref.items():
            if other != name:
                out[f"{name} vs {other}"] = {"y_max_abs": (y - y0).abs().max().item(),
                                             "y_mismatches": int((y != y0).sum()),
                                             "dx_max_abs": (dx - dx0).abs().max().item(),
                                             "dstep_max_rel": ((ds - ds0).abs() / ds0.abs()).max().item()}
    return out


def measure(args, case_name: str, case) -> dict:
    a = make_inputs(*case, args.device)
    fns = variants(args.compile)
    runs = {n: fwd_bwd(f, a) for n, f in fns.items()}
    timings = interleave(runs, BASE, args.rounds, args.device, repeat=args.iters, warmup=args.warmup)
    result = {"case": case_name, "shape": list(case[0]), "bits": case[1], "per_channel": case[2],
              "check": compare(fns, case, args.device), "variants": {}}
    ref = timings["reference"]["ratios"]
    for name, t in timings.items():
        row = {"time_s": summary(t["times"]), "ratio_to_torch": summary(t["ratios"]),
               "ratio_to_reference": summary([r / q for r, q in zip(t["ratios"], ref)]),
               "saved_bytes": saved_bytes(fns[name], a), "memory": peak_memory(runs[name], args.device)}
        result["variants"][name] = row
        print(f"{case_name} {name}: {row['time_s']['median'] * 1e3:.2f} ms, / torch {spread(row['ratio_to_torch'])}",
              flush=True)
    return result


def markdown(results: list[dict], targets: list[dict], args) -> str:
    parts = [f"fwd+bwd, {args.iters} calls per slot, {args.rounds} interleaved rounds; ratios = median of "
             "per-round ratios [min-max]; saved = bytes kept for backward beyond the inputs; peak = peak "
             "memory of one fwd+bwd above the inputs."]
    for res in results:
        rows = [[name, v["time_s"]["median"] * 1e3, spread(v["ratio_to_torch"]), v["ratio_to_reference"]["median"],
                 v["saved_bytes"] / MB, v["memory"]["peak_bytes"] / MB] for name, v in res["variants"].items()]
        checks = [[k, v["y_max_abs"], v["y_mismatches"], v["dx_max_abs"], f"{v['dstep_max_rel']:.1e}"]
                  for k, v in res["check"].items() if isinstance(v, dict)]
        parts.append(f"### {res['case']} ({res['bits']} bit)\n\n" + md_table(
            ["variant", "ms", "time / torch", "time / textbook", "saved MB", "peak MB"], rows)
            + f"\n\nValues (elements in the half-bins outside the range, where the gradient definitions differ: "
            f"{res['check']['half_bin_fraction']:.1%} of the raw tensor; compared after moving them out):\n\n"
            + md_table(["pair", "max abs dy", "dy mismatches", "max abs dx", "max rel dstep"], checks))
    parts.append(targets_table(targets))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true",
                        help="add ours as compiled kernels and torch.compile'd ours and textbook LSQ")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=5, help="fwd+bwd calls per timed slot")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    cases = CASES
    if args.smoke:
        cases, args.rounds, args.iters, args.warmup = SMOKE_CASES, 2, 1, 1
    result = start(args)
    results = [measure(args, name, case) for name, case in cases.items()]
    first, main_case = results[0]["case"], results[0]["variants"]
    ours, ref = main_case["ours"], main_case["reference"]
    result["targets"] = [
        target(f"{first}: ours / torch fwd+bwd time", ours["ratio_to_torch"]["median"], 1.0),
        target(f"{first}: ours / textbook saved-for-backward bytes", ours["saved_bytes"] / ref["saved_bytes"], 1.0),
        target(f"{first}: ours / textbook peak memory",
               ours["memory"]["peak_bytes"] / ref["memory"]["peak_bytes"], 1.0)]
    if "ours+kernels" in main_case:
        result["targets"].append(target(f"{first}: ours as compiled kernels / torch fwd+bwd time",
                                        main_case["ours+kernels"]["ratio_to_torch"]["median"], 1.0))
    result["cases"] = results
    write_results(args, result, markdown(results, result["targets"], args), "quantizer_op")


if __name__ == "__main__":
    main()
