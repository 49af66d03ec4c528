"""Training-step time, images/s and peak memory of QAT/KD configs as ratios to the FP step.

    python -m bench.step_time                       # vit_6_4_32 and cct_7_3x1_32, batch 128 and 32
    python -m bench.step_time --configs fp,act2b,w2a2 --compile --name step_time_compile

A step is what qat.module.LitClassifier does: AdamW zero_grad(set_to_none) -> student forward (features
with MSE) -> teacher forward under no_grad in eval mode -> loss (soft-target CE vs teacher, else CE vs
labels) -> backward -> optimizer step -> clamp_steps_. Quantizers are initialised by one forward first.
"""
import torch
import torch.nn.functional as F

from bench.common import (base_parser, csv, interleave, isolated, machine_info, md_table, peak_memory, summary,
                          target, targets_table, write_results)
from qat.distill import DistillLoss
from qat.models import create_model
from qat.optim import param_groups
from qat.quant import QuantConfig, clamp_steps_, is_quant_param, quantize_

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


def build_step(model_name: str, config: str, batch: int, device: str, seed: int = 0):
    """A training step of `config` (a CONFIGS name, optionally + '+compile') on a fixed random batch or step((x, y))."""
    quant, kd, mse_alpha = CONFIGS[config.removesuffix(COMPILED)]
    torch.manual_seed(seed)
    model = create_model(model_name).to(device).train()
    if quant is not None:
        quantize_(model, QuantConfig(**quant))
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    with torch.no_grad():
        model(x)  # initialises the quantizer steps
    teacher = distill = None
    if kd:
        teacher = create_model(model_name).to(device).eval().requires_grad_(False)
        distill = DistillLoss(mse_alpha=mse_alpha)
    student = torch.compile(model) if config.endswith(COMPILED) else model
    opt = torch.optim.AdamW(param_groups(model, 0.06, None, is_quant_param), lr=5.5e-4)

    def step(batch=None):
        xb, yb = (x, y) if batch is None else batch
        opt.zero_grad(set_to_none=True)
        if teacher is None:
            loss = F.cross_entropy(student(xb), yb)
        else:
            feats = distill.needs_features
            out = student(xb, return_features=feats)
            with torch.no_grad():
                t_out = teacher(xb, return_features=feats)
            (logits, s_feats), (t_logits, t_feats) = (out, t_out) if feats else ((out, None), (t_out, None))
            loss, _ = distill(logits, t_logits, yb, F.cross_entropy, student_feats=s_feats, teacher_feats=t_feats)
        loss.backward()
        opt.step()
        clamp_steps_(model)
    return step


def teacher_forward(model_name: str, batch: int, device: str):
    torch.manual_seed(0)
    teacher = create_model(model_name).to(device).eval().requires_grad_(False)
    x = torch.randn(batch, 3, 32, 32, device=device)

    def forward():
        with torch.no_grad():
            teacher(x)
    return forward


def step_memory(model_name: str, config: str, batch: int, device: str, steps: int) -> dict:
    """Peak memory of `steps` training steps above the memory in use before the first one."""
    step = build_step(model_name, config, batch, device)
    return peak_memory(lambda: [step() for _ in range(steps)], device)


def measure(args, model_name: str, batch: int) -> list[dict]:
    fns = {c: build_step(model_name, c, batch, args.device) for c in args.configs}
    if any(CONFIGS[c.removesuffix(COMPILED)][1] for c in args.configs):
        fns[TEACHER] = teacher_forward(model_name, batch, args.device)
    timings = interleave(fns, "fp", args.rounds, args.device, repeat=args.steps, warmup=args.warmup)
    rows = []
    for config, t in timings.items():
        row = {"model": model_name, "batch": batch, "config": config, "time_s": summary(t["times"]),
               "ratio": summary(t["ratios"])}
        row["images_per_s"] = batch / row["time_s"]["median"]
        if config != TEACHER and args.memory != "off":
            run = isolated if args.memory == "isolated" else (lambda fn, *a: fn(*a))
            row["memory"] = run(step_memory, model_name, config, batch, args.device, args.steps)
        rows.append(row)
        print(f"{model_name} b{batch} {config}: {row['time_s']['median'] * 1e3:.1f} ms, ratio "
              f"{row['ratio']['median']:.3f}", flush=True)
    fp_mem = rows[0].get("memory", {}).get("peak_bytes")
    for row in rows:
        if fp_mem and "memory" in row:
            row["memory"]["ratio"] = row["memory"]["peak_bytes"] / fp_mem
    return rows


def kd_extra(rows: list[dict], model_name: str, batch: int, kd: str = "act2b_kd", base: str = "act2b"):
    """(KD step - no-KD step) / teacher forward, per round from the times relative to the adjacent FP steps."""
    by = {r["config"]: r["ratio"]["all"] for r in rows if r["model"] == model_name and r["batch"] == batch}
    if not {kd, base, TEACHER} <= set(by):
        return None
    return summary([(k - b) / t for k, b, t in zip(by[kd], by[base], by[TEACHER])])["median"]


def check_targets(rows: list[dict], model_name: str, batch: int) -> list[dict]:
    at = {r["config"]: r for r in rows if r["model"] == model_name and r["batch"] == batch}

    def ratio(config):
        return at[config]["ratio"]["median"] if config in at else None
    w2a2_mem = at.get("w2a2", {}).get("memory", {}).get("ratio")
    where = f"{model_name} b{batch}"
    return [target(f"{where}: w2a2 step / FP step", ratio("w2a2"), 1.15),
            target(f"{where}: act2b+attn step / FP step", ratio("act2b_attn"), 1.30),
            target(f"{where}: KD extra time / teacher no-grad forward", kd_extra(rows, model_name, batch), 1.1),
            target(f"{where}: w2a2 peak memory / FP peak memory", w2a2_mem, 1.25)]


def markdown(rows: list[dict], targets: list[dict], args) -> str:
    parts = [f"Step = fwd+bwd+AdamW, {args.steps} steps per slot, {args.rounds} interleaved rounds; "
             "ratio = median of per-round ratios to the FP step of the same round [min-max]."]
    for model_name in args.models:
        for batch in args.batches:
            table = []
            for r in (r for r in rows if r["model"] == model_name and r["batch"] == batch):
                mem = r.get("memory", {})
                table.append([r["config"], f"{r['ratio']['median']:.3f} [{r['ratio']['min']:.2f}-{r['ratio']['max']:.2f}]",
                              r["time_s"]["median"] * 1e3, r["images_per_s"],
                              mem.get("peak_bytes", 0) / 2**20 if mem else None, mem.get("ratio")])
            parts.append(f"### {model_name}, batch {batch}\n\n" + md_table(
                ["config", "time / FP", "ms", "img/s", "peak MB", "mem / FP"], table))
    parts.append("### Targets\n\n" + targets_table(targets))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--models", type=csv, default="vit_6_4_32,cct_7_3x1_32")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in csv(s)], default="128,32")
    parser.add_argument("--configs", type=csv, default=",".join(CONFIGS))
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd twin of every config")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed slot")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per config before the rounds")
    parser.add_argument("--memory", choices=("isolated", "inline", "off"), default="isolated",
                        help="peak memory per config in a fresh process (isolated), in this one, or not")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.rounds, args.steps, args.warmup = ["vit_2_4_32"], [8], 1, 1, 0
        args.memory = "inline" if args.memory == "isolated" else args.memory
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown or "fp" not in args.configs:
        parser.error(f"--configs {unknown or args.configs}: use names from {list(CONFIGS)}, 'fp' included")
    if args.compile:
        args.configs = args.configs + [c + COMPILED for c in args.configs]
    name = args.name or ("step_time_compile" if args.compile else "step_time")
    result = {"machine": machine_info(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    rows = [row for m in args.models for b in args.batches for row in measure(args, m, b)]
    batch = 128 if 128 in args.batches else args.batches[0]
    result["targets"] = check_targets(rows, args.models[0], batch)
    result["rows"] = rows
    write_results(args.out, name, result, markdown(rows, result["targets"], args))


if __name__ == "__main__":
    main()
