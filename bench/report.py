"""Collect the JSON results of the bench scripts into the tables of bench/README.md.

    python -m bench.report          # rewrites the part of bench/README.md between the results markers

Reads the <results>/*.json that the scripts wrote (step_time*, quantizer_op*, loader*, eval_speed*).
"""
import argparse
import json
from pathlib import Path

from bench.common import RESULTS, md_table, spread

README = Path(__file__).resolve().parent / "README.md"
SCRIPTS = ("step_time", "quantizer_op", "loader", "eval_speed")  # result files of other tools are skipped
BEGIN, END = "<!-- results: written by `python -m bench.report` -->", "<!-- end of results -->"


def machine_line(name: str, m: dict) -> str:
    return (f"- `{name}`: {m['cpu']}, torch threads {m['torch_threads']}{', --keep-heap' if m.get('keep_heap') else ''}"
            f", torch {m['torch']}, loadavg {m['loadavg_before'][0]:.1f} before / {m['loadavg_after'][0]:.1f} after")


def step_tables(results: dict) -> str:
    """One column per (result file, model, batch), one row per config."""
    runs = {}
    for name, res in results.items():
        if name.startswith("step_time"):
            extra = name.removeprefix("step_time").strip("_")
            for r in res["rows"]:
                runs.setdefault(f"{r['model']} b{r['batch']}" + (f" ({extra})" if extra else ""), {})[r["config"]] = r
    configs = list(dict.fromkeys(c for run in runs.values() for c in run))
    header = ["config"] + list(runs)
    times = [[c] + [spread(run[c]["ratio"], 2) if c in run else None for run in runs.values()] for c in configs]
    with_memory = {label: run for label, run in runs.items() if "memory" in run["fp"]}
    memory = [[c] + [run[c]["memory"]["ratio"] if "memory" in run.get(c, {}) else None for run in with_memory.values()]
              for c in configs if any("memory" in run.get(c, {}) for run in with_memory.values())]
    rounds = ", ".join(f"{label} {run['fp']['rounds']}" for label, run in runs.items())
    fp_rates = ", ".join(f"{label} {run['fp']['images_per_s']:.1f}" for label, run in runs.items())
    return ("#### Training step time / FP step (median [min-max] over interleaved rounds)\n\n"
            + md_table(header, times) + f"\n\nRounds: {rounds}. FP images/s (context only): {fp_rates}.\n\n"
            "#### Peak tensor memory of a training step / FP\n\n" + md_table(["config"] + list(with_memory), memory))


def op_table(res: dict) -> str:
    cases = res["cases"]
    names = list(cases[0]["variants"])
    rows = [[n] + [spread(c["variants"][n]["ratio_to_torch"], 2) for c in cases]
            + [cases[0]["variants"][n]["saved_bytes"] / 2**20, cases[0]["variants"][n]["memory"]["peak_bytes"] / 2**20]
            for n in names]
    first = cases[0]["case"].split(" per")[0]
    return ("#### LSQ fake-quant fwd+bwd time / torch's learnable fake-quant\n\n"
            + md_table(["variant"] + [c["case"] for c in cases] + [f"saved MB ({first})", f"peak MB ({first})"], rows))


def loader_table(res: dict) -> str:
    rows = [[r["aug"], r["loader_images_per_s"], r["loader_over_step"], spread(r["fed_step_over_step"], 2)]
            for r in res["rows"]]
    return (f"#### Data loading ({res['args']['workers']} workers, batch {res['args']['batch']}, "
            f"FP step {res['fp_step_images_per_s']:.1f} img/s)\n\n"
            + md_table(["augmentation", "loader img/s", "loader / FP step", "FP step fed by the loader / alone"], rows))


def eval_table(results: dict) -> str:
    rows = [r for name, res in results.items() if name.startswith("eval_speed") for r in res["rows"]]
    return ("#### Evaluation images/s (time / FP per batch)\n\n"
            + md_table(["model", "config", "img/s", "time / FP"],
                       [[r["model"], r["config"], r["images_per_s"], spread(r["ratio"], 2)] for r in rows]))


def report(folder: Path = RESULTS) -> str:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.stem.startswith(SCRIPTS)}
    targets = [[name, t["name"], None if t["value"] is None else f"{t['value']:.3f}", t["limit"], t["met"]]
               for name, res in results.items() for t in res.get("targets", []) if t["value"] is not None]
    parts = ["Measured on:\n\n" + "\n".join(machine_line(n, r["machine"]) for n, r in results.items()),
             "#### Targets\n\n" + md_table(["file", "target", "measured", "limit", "met"], targets)]
    if any(n.startswith("step_time") for n in results):
        parts.append(step_tables(results))
    parts += [op_table(r) for n, r in results.items() if n.startswith("quantizer_op")]
    parts += [loader_table(r) for n, r in results.items() if n.startswith("loader")]
    if any(n.startswith("eval_speed") for n in results):
        parts.append(eval_table(results))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    head, rest = text.split(BEGIN)
    args.readme.write_text(f"{head}{BEGIN}\n\n{report(args.results)}\n\n{END}{rest.split(END)[1]}")
    print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
