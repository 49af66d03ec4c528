"""Pictures of runs without an account: `python -m qat.report <run dir>... [--out DIR]`.

Reads each run's metrics.csv (Lightning CSVLogger, with the quantizer telemetry `quant/<name>/<stat>`) and
summary.json, writes PNGs (curves of several runs overlaid, one colour per run; per-layer quantizer steps;
layer x epoch heatmaps of clip fraction and weight-code flip rate) and a report.md that embeds them.
Every plotting function returns the data it drew, so tests can compare it with metrics.csv.
"""
import argparse
import csv
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = {"accuracy (%)": ("train/acc1", "val/acc1"), "loss": ("train/loss_epoch", "val/loss")}
SUMMARY_COLUMNS = ("name", "model", "quant_choice", "kd", "best_val_acc", "final_val_acc", "test_acc",
                   "epochs_completed", "finished")


def read_metrics(run: str | Path) -> list[dict[str, float]]:
    """Rows of <run>/metrics.csv with the empty cells left out and the values as floats."""
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no metrics.csv (is it a run dir written with logger=csv?)")
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def series(rows: list[dict], key: str, x: str = "epoch") -> tuple[list[float], list[float]]:
    """(x values, key values) of the rows that hold `key`."""
    picked = [(row[x], row[key]) for row in rows if key in row and x in row]
    return [p[0] for p in picked], [p[1] for p in picked]


def save_figure(fig, path: Path) -> None:
    """Write `fig` as a PNG atomically and close it."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(runs: dict[str, list[dict]], path: Path) -> dict:
    """Accuracy and loss per epoch (train solid, val dashed), one colour per run; returns {run: {key: (x, y)}}."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = {}
    for colour, (label, rows) in zip(colours(len(runs)), runs.items()):
        drawn[label] = {}
        for ax, (title, keys) in zip(axes, CURVES.items()):
            scale = 100.0 if "acc" in title else 1.0
            for key, style in zip(keys, ("-", "--")):
                x, y = series(rows, key)
                drawn[label][key] = (x, [scale * v for v in y])
                if x:
                    ax.plot(x, drawn[label][key][1], style, color=colour, label=f"{label} {key}")
            ax.set(xlabel="epoch", title=title)
    for ax in axes:
        ax.grid(alpha=0.3)
        legend(ax, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return drawn


def lr_key(rows: list[dict]) -> str:
    """The metrics.csv column of the main lr: LearningRateMonitor's 'lr-<optimizer>/decay' group, else the first."""
    keys = sorted({k for row in rows for k in row if k.startswith("lr-")}, key=lambda k: not k.endswith("/decay"))
    return keys[0] if keys else "lr"


def plot_lr(runs: dict[str, list[dict]], path: Path) -> dict:
    """Learning rate per epoch, one colour per run; returns {run: (x, y)}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = {}
    for colour, (label, rows) in zip(colours(len(runs)), runs.items()):
        drawn[label] = series(rows, lr_key(rows))
        ax.plot(*drawn[label], color=colour, label=label)
    ax.set(xlabel="epoch", ylabel="lr", title="learning rate", yscale="log")
    ax.grid(alpha=0.3)
    legend(ax, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return drawn


def legend(ax, **kwargs) -> None:
    """A legend when something labelled was drawn."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def layers(rows: list[dict], stat: str) -> list[str]:
    """Quantizer names with a `quant/<name>/<stat>` column, in first-seen order."""
    names = {}
    for row in rows:
        for key in row:
            if key.startswith("quant/") and key.endswith(f"/{stat}") and key.count("/") == 2:
                names[key.split("/")[1]] = None
    return list(names)


def plot_steps(rows: list[dict], path: Path, title: str) -> dict:
    """Each quantizer's step size over training steps; returns {quantizer: (steps, values)}."""
    fig, ax = plt.subplots(figsize=(9, 5))
    drawn = {}
    names = layers(rows, "step")
    for colour, name in zip(colours(len(names)), names):
        drawn[name] = series(rows, f"quant/{name}/step", x="step")
        ax.plot(*drawn[name], color=colour, label=name, linewidth=1)
    ax.set(xlabel="training step", ylabel="step size", yscale="log")
    ax.set_title(title, fontsize=9)
    legend(ax, fontsize=5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, path)
    return drawn


def epoch_of_steps(rows: list[dict]) -> list[tuple[float, int]]:
    """(last step, epoch) of every epoch, from the rows that carry both; sorted by step."""
    last = {}
    for row in rows:
        if "epoch" in row and "step" in row:
            last[int(row["epoch"])] = max(last.get(int(row["epoch"]), row["step"]), row["step"])
    return sorted((step, epoch) for epoch, step in last.items())


def heatmap_data(rows: list[dict], stat: str) -> tuple[list[str], list[int], list[list[float | None]]]:
    """(quantizers, epochs, mean of quant/<name>/<stat> per quantizer and epoch); None where nothing was logged."""
    ends, names = epoch_of_steps(rows), layers(rows, stat)
    sums: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        epoch = next((e for step, e in ends if "step" in row and row["step"] <= step), None)
        for name in names:
            if epoch is not None and f"quant/{name}/{stat}" in row:
                sums.setdefault((name, epoch), []).append(row[f"quant/{name}/{stat}"])
    epochs = sorted({e for _, e in sums})
    matrix = [[sum(v) / len(v) if (v := sums.get((n, e))) else None for e in epochs] for n in names]
    return names, epochs, matrix


def plot_heatmap(rows: list[dict], stat: str, path: Path, title: str) -> tuple:
    """Layer x epoch heatmap of a telemetry statistic; returns heatmap_data's (names, epochs, matrix)."""
    names, epochs, matrix = heatmap_data(rows, stat)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(epochs) + 4), max(3.0, 0.22 * len(names) + 1.5)))
    values = [[float("nan") if v is None else v for v in row] for row in matrix]
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xticks(range(len(epochs)), epochs, fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)
    return names, epochs, matrix


def summary_table(runs: dict[str, Path]) -> str:
    """Markdown table of the runs' summary.json values."""
    lines = ["| run | " + " | ".join(SUMMARY_COLUMNS) + " |", "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    for label, run in runs.items():
        path = run / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        cells = [f"{v:.2f}" if isinstance(v := summary.get(c), float) else ("-" if v is None else str(v))
                 for c in SUMMARY_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def labels(run_dirs: list[Path]) -> dict[str, Path]:
    """A unique label (the run dir's name, prefixed by its parent's when names repeat) for every run."""
    names = [p.name for p in run_dirs]
    return {(f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name): p for p in run_dirs}


def write_report(run_dirs: list[str | Path], out: str | Path) -> dict:
    """All PNGs and report.md for `run_dirs` into `out`; returns {png name: data drawn}."""
    runs = labels([Path(r) for r in run_dirs])
    metrics = {label: read_metrics(run) for label, run in runs.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = {"curves.png": plot_curves(metrics, out / "curves.png"), "lr.png": plot_lr(metrics, out / "lr.png")}
    md = ["# Run report", "", summary_table(runs), "", "![accuracy and loss](curves.png)", "",
          "![learning rate](lr.png)", ""]
    for i, (label, rows) in enumerate(metrics.items()):
        md += [f"## {label}", ""]
        plots = [("steps", "step", plot_steps, "quantizer step size"),
                 ("clip", "clip", plot_heatmap, "clip fraction (layer x epoch)"),
                 ("flip", "flip", plot_heatmap, "weight-code flip rate (layer x epoch)")]
        for kind, stat, plot, title in plots:
            if not layers(rows, stat):
                md += [f"No `quant/*/{stat}` telemetry in this run ({title}).", ""]
                continue
            name = f"{kind}_{i}.png"
            args = (rows, out / name, f"{label}: {title}") if plot is plot_steps else (rows, stat, out / name,
                                                                                       f"{label}: {title}")
            drawn[name] = plot(*args)
            md += [f"![{title}]({name})", ""]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, out / "report.md")
    return drawn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qat.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run dirs (holding metrics.csv and summary.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <run>/report for one run, <common parent>/report for several)")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.csv").is_file()]
    if missing:
        parser.error(f"no metrics.csv in {', '.join(missing)}: give run dirs written with the CSV logger")
    out = args.out or (args.runs[0] / "report" if len(args.runs) == 1 else
                       Path(os.path.commonpath([r.resolve() for r in args.runs])) / "report")
    drawn = write_report(args.runs, out)
    print(f"report: {len(drawn)} PNGs and report.md -> {out / 'report.md'}")


if __name__ == "__main__":
    main()
