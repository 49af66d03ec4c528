"""Training-step time, images/s and peak memory of QAT/KD configs as ratios to the FP step.

    python -m bench.step_time                                   # vit_6_4_32, batch 128 and 32
    python -m bench.step_time --models cct_7_3x1_32 --name step_time_cct
    python -m bench.step_time --configs fp,act2b,w2a2,act2b_attn --kernels --compile  # -> step_time_compile

--kernels adds '<config>+kernels' for the quantized configs (eager model, the quantizer math as compiled
kernels: compile=quantizers), --compile '<config>+compile' (the whole student: compile=true).

A step is what training runs, built from the library: qat.module.LitClassifier.training_step (student
forward; with KD the teacher forward under no_grad in eval mode and qat.distill.DistillLoss, features and
embedding MSE included) -> backward -> the AdamW of LitClassifier.configure_optimizers -> clamp_steps_.
Quantizer steps are initialised by one train-mode forward first, as the calibration batch does.
"""
import warnings

import torch

from bench.common import (base_parser, csv, interleave, md_table, peak_memory, spread, start, summary, target,
                          targets_table, write_results)
from qat.distill import DistillLoss
from qat.models import create_model
from qat.module import LitClassifier
from qat.optim import OptimConfig
from qat.quant import QuantConfig, clamp_steps_, compile_quantizers, quantize_

A2 = {"bits": 2}
CONFIGS = {  # name: (QuantConfig kwargs or None, KD on, embedding-MSE alpha)
    "fp": (None, False, 0.0),
    "act2b": ({"act": A2}, False, 0.0),
    "w2b": ({"weight": A2}, False, 0.0),
    "w2a2": ({"weight": A2, "act": A2}, False, 0.0),
    "act2b_attn": ({"act": A2, "attn": A2}, False, 0.0),
    "act2b_kd": ({"act": A2}, True, 0.0),
    "act2b_kd_mse": ({"act": A2}, True, 2.0),
}
TEACHER = "teacher_fwd"  # standalone no-grad forward of the KD teacher, timed like a config
COMPILED = "+compile"
KERNELS = "+kernels"


def check_configs(parser, configs: list[str]) -> None:
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or "fp" not in configs:
        parser.error(f"--configs {','.join(unknown or configs)}: use names from {list(CONFIGS)}, 'fp' included")


def base_config(config: str) -> str:
    return config.removesuffix(COMPILED).removesuffix(KERNELS)


def quantized_model(model_name: str, config: str, calib: torch.Tensor) -> torch.nn.Module:
    """`model_name` quantized as `config`, quantizer steps initialised by a train-mode forward on `calib`."""
    model = create_model(model_name).to(calib.device)
    quant = CONFIGS[base_config(config)][0]
    if quant is not None:
        quantize_(model, QuantConfig(**quant))
        if config.endswith(KERNELS):
            compile_quantizers(model)
        with torch.no_grad():
            model.train()(calib)
    return model.train()


def build_step(model_name: str, config: str, batch: int, device: str, seed: int = 0):
    """A training step of `config` (a CONFIGS name, maybe + KERNELS or COMPILED): step() on a fixed random batch,
    step((x, y)) on a given one."""
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model = quantized_model(model_name, config, x)
    _, kd, mse_alpha = CONFIGS[base_config(config)]
    teacher = create_model(model_name).to(device).eval().requires_grad_(False) if kd else None
    lit = LitClassifier(model, OptimConfig(epochs=300), {"num_classes": 10}, teacher=teacher,
                        distill=DistillLoss(mse_alpha=mse_alpha) if kd else None).to(device)
    opt = lit.configure_optimizers()["optimizer"]
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step without a Trainer: logs nothing
    if config.endswith(COMPILED):
        model.compile()  # in place, as compile=true does

    def step(data=None):
        opt.zero_grad(set_to_none=True)
        lit.training_step((x, y) if data is None else data, 0).backward()
        opt.step()
        clamp_steps_(model)
    return step


def teacher_forward(model_name: str, batch: int, device: str):
    torch.manual_seed(0)
    teacher = create_model(model_name).to(device).eval().requires_grad_(False)
    x = torch.randn(batch, 3, 32, 32, device=device)

    @torch.no_grad()
    def forward():
        teacher(x)
    return forward


def measure(args, model_name: str, batch: int) -> list[dict]:
    steps = {c: build_step(model_name, c, batch, args.device) for c in args.configs}
    memory = {c: peak_memory(step, args.device) for c, step in steps.items()} if args.memory else {}
    if any(CONFIGS[base_config(c)][1] for c in args.configs):
        steps[TEACHER] = teacher_forward(model_name, batch, args.device)
    timings = interleave(steps, "fp", args.rounds, args.device, repeat=args.steps, warmup=0 if memory else 1,
                         budget_s=args.budget * 60)
    rows = []
    for config, t in timings.items():
        row = {"model": model_name, "batch": batch, "config": config, "time_s": summary(t["times"]),
               "ratio": summary(t["ratios"]), "rounds": len(t["ratios"])}
        row["images_per_s"] = batch / row["time_s"]["median"]
        if config in memory:
            row["memory"] = memory[config] | {"ratio": memory[config]["peak_bytes"] / memory["fp"]["peak_bytes"]}
        rows.append(row)
        print(f"{model_name} b{batch} {config}: {row['time_s']['median'] * 1e3:.1f} ms, ratio {spread(row['ratio'])}",
              flush=True)
    return rows


def kd_extra(rows: list[dict], kd: str = "act2b_kd", base: str = "act2b") -> float | None:
    """(KD step - no-KD step) / teacher forward, per round from the times relative to the adjacent FP steps."""
    by = {r["config"]: r["ratio"]["all"] for r in rows}
    if not {kd, base, TEACHER} <= set(by):
        return None
    return summary([(k - b) / t for k, b, t in zip(by[kd], by[base], by[TEACHER])])["median"]


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets; the time ones also with compiled quantizer kernels (a+kernels / fp, eager model)
    and between compiled steps (a / fp, both compiled) where those were measured."""
    ratios = {r["config"]: r["ratio"]["all"] for r in rows}
    where = f"{rows[0]['model']} b{rows[0]['batch']}"

    def ratio(config, suffix=""):
        if config + suffix not in ratios:
            return None
        return summary([a / f for a, f in zip(ratios[config + suffix], ratios["fp" + suffix])])["median"]
    memory = {r["config"]: r["memory"]["ratio"] for r in rows if "memory" in r}
    targets = [target(f"{where}: w2a2 step / FP step", ratio("w2a2"), 1.15),
               target(f"{where}: act2b+attn step / FP step", ratio("act2b_attn"), 1.30),
               target(f"{where}: KD extra time / teacher no-grad forward", kd_extra(rows), 1.1),
               target(f"{where}: w2a2 peak memory / FP peak memory", memory.get("w2a2"), 1.25)]
    if "w2a2" + KERNELS in ratios:
        targets += [target(f"{where}: w2a2 step / FP step, compiled quantizer kernels",
                           ratio("w2a2" + KERNELS), 1.15),
                    target(f"{where}: act2b+attn step / FP step, compiled quantizer kernels",
                           ratio("act2b_attn" + KERNELS), 1.30)]
    if "fp" + COMPILED in ratios:
        targets += [target(f"{where}: w2a2 step / FP step, both compiled", ratio("w2a2", COMPILED), 1.15),
                    target(f"{where}: act2b+attn step / FP step, both compiled", ratio("act2b_attn", COMPILED), 1.30)]
    return targets


def markdown(rows: list[dict], targets: list[dict], args) -> str:
    parts = [f"Step = LitClassifier.training_step + backward + AdamW step, {args.steps} step(s) per slot, FP step "
             f"between any two configs, up to {args.rounds} rounds (see `rounds`); time / FP = median over rounds "
             "of the time relative to the adjacent FP steps [min-max]. Peak MB: tensor memory of one step "
             "(activations, gradients, optimizer state, temporaries; profiler allocation trace)."]
    for model_name in args.models:
        for batch in args.batches:
            table = [[r["config"], spread(r["ratio"]), r["rounds"], r["time_s"]["median"] * 1e3, r["images_per_s"],
                      r["memory"]["peak_bytes"] / 2**20 if "memory" in r else None, r.get("memory", {}).get("ratio")]
                     for r in rows if r["model"] == model_name and r["batch"] == batch]
            parts.append(f"### {model_name}, batch {batch}\n\n" + md_table(
                ["config", "time / FP", "rounds", "ms", "img/s", "peak MB", "mem / FP"], table))
    parts.append(targets_table(targets))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--models", type=csv, default="vit_6_4_32")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in csv(s)], default="128,32")
    parser.add_argument("--configs", type=csv, default=",".join(CONFIGS))
    parser.add_argument("--kernels", action="store_true", help="add twins with compiled quantizer kernels")
    parser.add_argument("--compile", action="store_true", help="add twins with the whole student compiled")
    parser.add_argument("--rounds", type=int, default=5, help="at most this many interleaved rounds")
    parser.add_argument("--budget", type=float, default=2.0, help="minutes of timing rounds per model and batch")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed slot")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.rounds = ["vit_2_4_32"], [8], 1
    check_configs(parser, args.configs)
    args.configs = (args.configs + [c + KERNELS for c in args.configs if args.kernels and CONFIGS[c][0] is not None]
                    + [c + COMPILED for c in args.configs if args.compile])
    result = start(args)
    runs = [measure(args, m, b) for m in args.models for b in args.batches]
    result["targets"] = [t for rows in runs for t in check_targets(rows)]
    result["rows"] = [row for rows in runs for row in rows]
    write_results(args, result, markdown(result["rows"], result["targets"], args),
                  "step_time_compile" if args.compile else "step_time")


if __name__ == "__main__":
    main()
