"""PTQ speed: calibration time per observer, AdaRound iterations/s vs a textbook loop, recon time scaling,
bias correction vs whole forward passes.

    python -m bench.ptq_bench            # resnet20, 1024 images; writes bench/results/ptq_bench.json (+ table)
    python -m bench.ptq_bench --smoke    # tiny sizes, seconds
    python -m bench.ptq_bench --only bias_correction   # one section (its own ptq_bench_<section>.json / .md)
    python -m bench.ptq_bench --collect outputs/multirun/<ptq multirun>   # accuracy tables of PTQ runs

Weights are random (BatchNorm statistics from random batches) and images N(0, 1): these are times, not
accuracies (accuracy tables need trained zoo checkpoints). One intra-op thread throughout.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from qat.models import create_model
from qat.ptq.adaround import GAMMA, ZETA
from qat.ptq.bias_correction import bias_correct_, output_moments, quant_layers
from qat.ptq.calibrate import calibrate
from qat.ptq.observers import OBSERVERS, create_observer
from qat.ptq.reconstruct import ReconConfig, capture, fit_unit, reconstruct_, units
from qat.quant import QuantConfig, quantize_, quantizers_off

OUT = Path(__file__).parent / "results"


def model_and_images(name: str, n: int, bits: int = 4, act_bits: int | None = None, per_channel: bool = True):
    torch.manual_seed(0)
    model = create_model(name)
    with torch.no_grad():
        model.train()(torch.randn(64, 3, 32, 32))
    act = None if act_bits is None else {"bits": act_bits, "per_channel": per_channel}
    model = quantize_(model.eval(), QuantConfig(weight={"bits": bits, "per_channel": per_channel}, act=act))
    return model, list(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).split(128))


def calibration_times(n: int) -> list[dict]:
    """Seconds of `calibrate` (W4A4, weights + inputs) per observer and granularity on resnet20."""
    rows = []
    for name in OBSERVERS:
        for per_channel in (False, True):
            model, batches = model_and_images("resnet20", n, act_bits=4, per_channel=per_channel)
            start = time.perf_counter()
            calibrate(model, batches, create_observer(name))
            rows.append({"observer": name, "granularity": "channel" if per_channel else "layer",
                         "seconds": time.perf_counter() - start})
    return rows


def textbook_fit(unit: nn.Module, inputs, targets, cfg: ReconConfig) -> None:
    """The AdaRound loss written plainly: floor(W / s) and h recomputed every step, every parameter tracked."""
    layers = [m for m in unit.modules() if hasattr(m, "weight_quantizer")]
    qs = [m.weight_quantizer for m in layers]
    alphas = []
    for m, q in zip(layers, qs):
        rest = m.weight.detach() / q.step.detach() - (m.weight.detach() / q.step.detach()).floor()
        alphas.append(nn.Parameter(-torch.log((ZETA - GAMMA) / (rest.clamp(0, 1 - 1e-6) - GAMMA) - 1)))
    opt = torch.optim.Adam(alphas, lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    originals = [m.weight_quantizer for m in layers]
    for it in range(cfg.iters):
        for m, q, a in zip(layers, qs, alphas):
            h = torch.clamp(torch.sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0, 1)
            w = torch.clamp(torch.floor(m.weight / q.step) + h, q.qmin, q.qmax) * q.step
            m.weight_quantizer = _Const(w)
        idx = torch.randint(len(inputs), (cfg.batch_size,), generator=gen)
        rec = (unit(inputs[idx].float()) - targets[idx].float()).pow(2).sum(1).mean()
        beta = 20 - 18 * it / cfg.iters
        reg = sum((1 - (2 * torch.clamp(torch.sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0, 1) - 1).abs().pow(beta)).sum()
                  for a in alphas)
        opt.zero_grad()
        (rec + cfg.reg_weight * reg).backward()
        opt.step()
    for m, q in zip(layers, originals):
        m.weight_quantizer = q


class _Const(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, weight):
        return self.w


def adaround_speed(iters: int, batch: int) -> list[dict]:
    """Iterations/s of our fit_unit vs `textbook_fit` on the same unit, inputs and config (W4, same process)."""
    rows = []
    for label, gran in (("resnet20 BasicBlock", "block"), ("resnet20 conv layer", "layer")):
        model, batches = model_and_images("resnet20", 4 * batch)
        calibrate(model, batches, create_observer("minmax"))
        name, unit = units(model, gran)[3]
        with quantizers_off(model):
            targets = capture(model, unit, batches, output=True)
        inputs = capture(model, unit, batches, output=False)
        cfg = ReconConfig(granularity=gran, iters=iters, batch_size=batch)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        start = time.perf_counter()
        textbook_fit(unit, inputs, targets, cfg)
        textbook = iters / (time.perf_counter() - start)
        model.load_state_dict(state)
        start = time.perf_counter()
        with torch.enable_grad():
            fit_unit(unit, inputs, targets, cfg)
        ours = iters / (time.perf_counter() - start)
        rows.append({"unit": f"{label} ({name})", "batch": batch, "ours_it_s": ours, "textbook_it_s": textbook,
                     "ratio": ours / textbook})
    return rows


def vit_block_speed(iters: int, batch: int, name: str = "vit_6_4_32") -> list[dict]:
    """Block reconstruction iterations/s of `name` at W4A4 (per-channel weights, per-tensor inputs) for the
    BRECQ and AdaQTransform sets, and the whole model's fitting time at 1000 iterations per unit from it."""
    rows = []
    for label, learn, drop in (("brecq", ("alpha",), 0.0), ("adaqtransform", ("alpha", "s_x", "xi", "eta"), 0.5)):
        torch.manual_seed(0)
        config = QuantConfig(weight={"bits": 4, "per_channel": True}, act={"bits": 4}, add_bias=True)
        model = quantize_(create_model(name).eval(), config)
        batches = list(torch.randn(4 * batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).split(batch))
        calibrate(model, batches, create_observer("minmax"))
        todo = units(model, "block")
        unit = dict(todo)["classifier.blocks.0"]
        with quantizers_off(model):
            targets = capture(model, unit, batches, output=True)
        inputs = capture(model, unit, batches, output=False)
        cfg = ReconConfig(learn=learn, drop_prob=drop, iters=iters, batch_size=batch)
        start = time.perf_counter()
        with torch.enable_grad():
            fit_unit(unit, inputs, targets, cfg)
        rate = iters / (time.perf_counter() - start)
        rows.append({"model": name, "set": label, "batch": batch, "block_it_s": rate, "units": len(todo),
                     "model_min_at_1000_it": len(todo) * 1000 / rate / 60})
    return rows


def recon_scaling(models: list[str], iters: list[int], n: int) -> list[dict]:
    """Seconds of layer-wise reconstruct_ (W4) for each model (number of layers) x iterations."""
    rows = []
    for name in models:
        for it in iters:
            model, batches = model_and_images(name, n)
            calibrate(model, batches, create_observer("minmax"))
            layers = len(units(model, "layer"))
            start = time.perf_counter()
            reconstruct_(model, batches, ReconConfig(granularity="layer", iters=it, batch_size=32))
            seconds = time.perf_counter() - start
            rows.append({"model": name, "layers": layers, "iters": it, "seconds": seconds,
                         "ms_per_layer_iter": 1000 * seconds / (layers * it)})
    return rows


@torch.no_grad()
def whole_pass_bias_correct_(model: nn.Module, batches: list) -> None:
    """The baseline: every layer's mean output from whole forward passes (bias_correct_ before it stopped them)."""
    layers = quant_layers(model)
    with quantizers_off(model):
        fp = output_moments(model, layers, batches)
    for name, layer in layers.items():
        error = output_moments(model, {name: layer}, batches)[name][0] - fp[name][0]
        layer.bias.sub_(error.to(layer.bias.dtype))


def bias_correction_speed(n: int, models: list[str]) -> list[dict]:
    """Seconds of bias_correct_ (each layer's pass ends at that layer) vs whole passes, same model and images;
    the corrected biases must agree."""
    rows = []
    for name in models:
        times, biases = {}, {}
        for label, correct in (("whole", whole_pass_bias_correct_), ("stopped", bias_correct_)):
            torch.manual_seed(0)
            model = create_model(name)
            with torch.no_grad():
                model.train()(torch.randn(64, 3, 32, 32))
            model = quantize_(model.eval(), QuantConfig(weight={"bits": 4, "per_channel": True}, add_bias=True))
            batches = list(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).split(128))
            calibrate(model, batches, create_observer("minmax"))
            start = time.perf_counter()
            correct(model, batches)
            times[label] = time.perf_counter() - start
            biases[label] = torch.cat([m.bias.detach().flatten() for m in quant_layers(model).values()])
        rows.append({"model": name, "layers": len(quant_layers(model)), "images": n, "whole_s": times["whole"],
                     "stopped_s": times["stopped"], "speedup": times["whole"] / times["stopped"],
                     "max_bias_diff": float((biases["whole"] - biases["stopped"]).abs().max())})
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def method_label(summary: dict) -> str:
    ptq = summary["method"]
    obs = ptq["observer"]["name"] + ("_channel" if ptq["granularity"] == "channel" else "_layer")
    recon = ptq["recon"]
    prefix = "PTQ/"
    if recon and recon.get("enabled"):
        drop = f",drop{recon['drop_prob']:g}" if recon["drop_prob"] else ""
        prefix = f"recon[{'+'.join(recon['learn'])},{recon['granularity']}{drop},{recon['iters']}it]/"
    name = prefix + ("awq" if ptq["awq"] else obs) + ("+cle" if ptq.get("cle") else "")
    correction = {True: "+bias_correct", "empirical": "+bias_correct", "variance": "+variance_correct",
                  "bn_stats": "+bn_stats_bias"}
    quant = summary.get("quant") or {}  # seed 004: stem / head bits, groups on the post-LayerNorm inputs
    stem = f"+stem_head{quant['head_stem_bits']}b" if quant.get("head_stem_bits") else ""
    groups = f"+groups{quant['n_groups']}{'dyn' if quant.get('dynamic_groups') else ''}" if quant.get("n_groups") \
        else ""
    return name + correction.get(ptq["bias_correct"], "") + stem + groups


def unit_loss_cell(result: dict) -> str:
    """'final / start' over the calibration set, or '~rec_loss' (the last minibatch) for runs made before set_loss."""
    if "final_loss" in result:
        return f"{result['final_loss']:.3g} / {result['start_loss']:.3g}"
    return f"~{result['rec_loss']:.3g}"


def collect(root: str) -> str:
    """The seed's tables (method rows; W8A32..W2A32, W32A8..W32A2 and WxAy columns) from the summary.json files
    of PTQ runs below `root` (e.g. a `ptq.py -m` multirun dir): top-1 and seconds per cell; then the
    reconstruction loss of every unit for the runs that reconstructed."""
    cells, fp, losses = {}, {}, {}
    for path in sorted(Path(root).rglob("summary.json")):
        s = json.loads(path.read_text())
        bits = s["bits"]
        col = f"W{bits['weight'] or 32}A{bits['act'] or 32}"
        label = method_label(s) + ("" if s.get("calib_data", "real") == "real" else f" [calib: {s['calib_data']}]")
        cells[(s["model"], label, col)] = f"{s['quant_acc']:.2f} ({s['total_time_s']:.0f}s)"
        if fp.get(s["model"]) is None:  # ptq.test_before_calibration=false leaves fp_acc null
            fp[s["model"]] = s["fp_acc"]
        if "recon" in s:
            losses[(s["model"], col, label)] = {u: unit_loss_cell(r) for u, r in s["recon"]["units"].items()}
    out = []
    for model in sorted(fp):
        both = sorted({c for (mod, _, c) in cells if mod == model and "32" not in c}, reverse=True)
        for cols in ([f"W{b}A32" for b in range(8, 1, -1)], [f"W32A{b}" for b in range(8, 1, -1)], both):
            out += _table(model, fp[model], cells, cols)
    for (model, col), rows in _group(losses).items():
        units = list(dict.fromkeys(u for r in rows.values() for u in r))
        out += [f"#### {model} {col}: reconstruction loss per unit (calibration set: final / nearest-rounding "
                "start; `~x` = last minibatch while fitting, older runs)", "",
                "| Method | " + " | ".join(units) + " |", "|---" * (len(units) + 1) + "|"]
        out += [f"| {m} | " + " | ".join(r.get(u, "") for u in units) + " |" for m, r in rows.items()]
        out.append("")
    return "\n".join(out)


def _table(model: str, fp: float | None, cells: dict, cols: list[str]) -> list[str]:
    rows = sorted({m for (mod, m, c) in cells if mod == model and c in cols})
    if not rows:
        return []
    lines = [f"#### {model}", "", "| Method | W32A32 | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    fp = "–" if fp is None else f"{fp:.2f}"
    lines += [f"| {m} | {fp} | " + " | ".join(cells.get((model, m, c), "") for c in cols) + " |" for m in rows]
    return lines + [""]


def _group(losses: dict) -> dict:
    grouped = {}
    for (model, col, method), units in sorted(losses.items()):
        grouped.setdefault((model, col), {})[method] = units
    return grouped


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--only", help="run one section: calibration, adaround, vit_block, scaling, bias_correction")
    parser.add_argument("--collect", metavar="DIR", help="print the accuracy tables of the PTQ runs below DIR")
    args = parser.parse_args(argv)
    if args.collect:
        print(collect(args.collect))
        return {}
    torch.set_num_threads(1)
    small = args.smoke
    sections = {
        "calibration": lambda: calibration_times(64 if small else 1024),
        "adaround": lambda: adaround_speed(5 if small else 200, 8 if small else 32),
        "vit_block": lambda: vit_block_speed(3 if small else 50, 8 if small else 32,
                                             "vit_2_4_32" if small else "vit_6_4_32"),
        "scaling": lambda: recon_scaling(["resnet20"] if small else ["resnet20", "resnet32"],
                                         [2, 4] if small else [50, 100], 32 if small else 256),
        "bias_correction": lambda: bias_correction_speed(16 if small else 256,
                                                         ["vit_2_4_32"] if small else ["resnet20", "vit_6_4_32"]),
    }
    if args.only and args.only not in sections:
        parser.error(f"--only {args.only}: choose one of {sorted(sections)}")
    result = {k: run() for k, run in sections.items() if args.only in (None, k)}
    stem = f"ptq_bench_{args.only}" if args.only else "ptq_bench"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n\n".join(f"### {k}\n\n{table(v)}" for k, v in result.items())
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
