"""Run rows of the experiment log by name, teachers first, and collect the results into the log's table.

    python sweep.py run 'log/*' --dry-run                     # print the ordered commands
    python sweep.py run log/28353 --with-deps --launcher joblib --budget short trainer=gpu
    python sweep.py collect outputs/sweeps/full               # -> results.md, results.csv

Each dependency level (rows whose teachers / init_from runs are finished) is one
`train.py -m experiment=a,b,...` multirun through the chosen Hydra launcher, so a level runs in parallel
with joblib or SLURM. Run dirs are stable (<outputs>/sweeps/<budget>/<name>): re-running the same command
skips rows with a finished summary.json and resumes the others from last.ckpt (resume=auto).
Arguments with '=' are passed to train.py as overrides.
"""
import argparse
import csv
import difflib
import fnmatch
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from qat.runs import summaries

ROOT = Path(__file__).resolve().parent
EXPERIMENTS = ROOT / "conf" / "experiment"
BUDGETS = ROOT / "conf" / "budget"
LAUNCHERS = {"local": "basic", "joblib": "joblib", "slurm": "slurm"}  # --launcher -> hydra/launcher
COLUMNS = ["Network", "Tricks", "Accuracy", "Run ID", "Output Dir", "Expected", "Diff"]
CSV_FIELDS = ["name", "network", "tricks", "best_val_acc", "final_val_acc", "test_acc", "expected_acc", "diff",
              "epochs_completed", "finished", "model", "quant", "kd", "output_dir"]


def experiment_names() -> list[str]:
    return sorted(p.relative_to(EXPERIMENTS).with_suffix("").as_posix() for p in EXPERIMENTS.rglob("*.yaml"))


def select(patterns: list[str], names: list[str]) -> list[str]:
    """Experiment names matching each name or glob, in the order given."""
    chosen = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            raise ValueError(f"experiment {pattern!r} is not in conf/experiment; close matches: "
                             f"{', '.join(close) if close else 'none'} (all: python sweep.py list)")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def dependencies(name: str) -> list[str]:
    """The experiment's `depends_on` (teachers, init_from runs), read from its YAML file."""
    return list(OmegaConf.load(EXPERIMENTS / f"{name}.yaml").get("depends_on") or [])


def finished_runs(root: Path) -> dict[str, Path]:
    """name -> summary.json of the newest finished run of that experiment below `root`."""
    found: dict[str, Path] = {}
    for summary in summaries(root, finished=True):
        if summary.get("name"):
            found.setdefault(summary["name"], summary["_path"])
    return found


def plan(selected: list[str], done: set[str], with_deps: bool, root: Path) -> list[list[str]]:
    """Dependency levels of the experiments still to run; level k only needs levels < k or `done` runs."""
    names = set(experiment_names())
    deps: dict[str, list[str]] = {}
    queue = [n for n in selected if n not in done]
    while queue:
        name = queue.pop(0)
        if name in deps:
            continue
        deps[name] = dependencies(name)
        for dep in deps[name]:
            if dep not in names:
                raise ValueError(f"{name}: depends_on entry {dep!r} is not an experiment config")
            if dep in done or dep in selected or dep in deps:
                continue
            if not with_deps:
                raise ValueError(f"{name} needs {dep}, which has no finished run under {root} and is not part of "
                                 f"this launch: run `python sweep.py run {dep}` first, or add --with-deps")
            queue.append(dep)
    levels, placed, pending = [], set(done), list(deps)
    while pending:
        level = [n for n in pending if all(d in placed for d in deps[n])]
        if not level:
            raise ValueError(f"depends_on forms a cycle among {pending}")
        levels.append(level)
        placed |= set(level)
        pending = [n for n in pending if n not in placed]
    return levels


def commands(levels: list[list[str]], sweep_dir: Path, launcher: str, budget: str, jobs: int | None,
             overrides: list[str]) -> list[list[str]]:
    """One `train.py -m` multirun per level, every run in the stable dir <sweep_dir>/<name>."""
    base = [sys.executable, str(ROOT / "train.py"), "-m", f"hydra/launcher={LAUNCHERS[launcher]}", f"budget={budget}",
            f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${name}", f"paths.output_root={sweep_dir}",
            "resume=auto"]
    if jobs is not None:
        base.append(f"hydra.launcher.n_jobs={jobs}")
    return [base + [f"experiment={','.join(level)}"] + overrides for level in levels]


def check_run_args(launcher: str, budget: str, jobs: int | None, dry_run: bool) -> None:
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher={launcher!r} is not one of {sorted(LAUNCHERS)}")
    submitit = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher")
    if launcher == "slurm" and not dry_run and submitit is None:
        raise ValueError("--launcher slurm needs hydra-submitit-launcher: pip install -e '.[slurm]'")
    budgets = sorted(p.stem for p in BUDGETS.glob("*.yaml"))
    if budget not in budgets:
        raise ValueError(f"--budget={budget!r} is not one of {budgets}")
    if jobs is not None and launcher != "joblib":
        raise ValueError(f"--jobs={jobs} needs --launcher joblib (got {launcher!r})")


def run(args: argparse.Namespace) -> int:
    check_run_args(args.launcher, args.budget, args.jobs, args.dry_run)
    overrides = [a for a in args.experiments if "=" in a]
    selected = select([a for a in args.experiments if "=" not in a], experiment_names())
    sweep_dir = Path(args.outputs).resolve() / "sweeps" / args.budget
    done = finished_runs(sweep_dir)
    for name in selected:
        if name in done:
            print(f"# skip {name}: finished ({done[name]})")
    levels = plan(selected, set(done), args.with_deps, sweep_dir)
    for name in (n for level in levels for n in level):
        last = sweep_dir / name / "checkpoints" / "last.ckpt"
        if last.is_file():
            print(f"# resume {name} from {last}")
    cmds = commands(levels, sweep_dir, args.launcher, args.budget, args.jobs, overrides)
    for i, (level, cmd) in enumerate(zip(levels, cmds)):
        print(f"# level {i}: {' '.join(level)}")
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            code = subprocess.call(cmd)
            if code:
                print(f"# level {i} failed (exit {code}); re-run the same command to resume", file=sys.stderr)
                return code
    if not cmds:
        print("# nothing to run: every selected experiment has finished")
    if not args.dry_run and summaries(sweep_dir):
        collect(sweep_dir, sweep_dir)
    return 0


def fmt(value, sign: bool = False) -> str:
    return "" if value is None else f"{value:+.2f}" if sign else f"{value:.2f}"


def table_row(summary: dict, root: Path) -> dict:
    """One run as the log's columns (for the Markdown) plus the raw numbers (for the CSV)."""
    name = str(summary.get("name") or "")
    network, _, tricks = str(summary.get("description") or "").partition(" | ")
    if not tricks:  # not a log row: the model, and the description or the command-line overrides
        network, tricks = str(summary.get("model") or ""), network or " ".join(summary.get("overrides") or [])
    acc, expected = summary.get("best_val_acc"), summary.get("expected_acc")
    diff = round(acc - expected, 4) if acc is not None and expected is not None else None
    run_dir = summary["_path"].parent
    progress = "" if summary.get("finished") else f" (epoch {summary.get('epochs_completed')}, unfinished)"
    return {"Network": network, "Tricks": tricks, "Accuracy": fmt(acc) + progress,
            "Run ID": name.removeprefix("log/"), "Output Dir": run_dir.relative_to(root).as_posix(),
            "Expected": fmt(expected), "Diff": fmt(diff, sign=True),
            "csv": {**{k: summary.get(k) for k in CSV_FIELDS}, "network": network, "tricks": tricks, "diff": diff,
                    "quant": json.dumps(summary["quant"]) if summary.get("quant") else "", "output_dir": str(run_dir)}}


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def collect(root: Path, out: Path) -> list[dict]:
    """Write <out>/results.md and <out>/results.csv for every summary.json below `root`; print the Markdown."""
    root = Path(root).resolve()
    runs = summaries(root)
    if not runs:
        raise ValueError(f"collect: no summary.json below {root}")
    rows = sorted((table_row(s, root) for s in runs), key=lambda r: (r["csv"]["name"] or "", r["Output Dir"]))
    log_rows = [r for r in rows if str(r["csv"]["name"]).startswith("log/")]
    other = [r for r in rows if not str(r["csv"]["name"]).startswith("log/")]
    text = f"# Results below {root}\n"
    for title, section in (("Experiment log", log_rows), ("Other runs", other)):
        if section:
            text += f"\n## {title}\n\n{markdown(section)}\n"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(r["csv"] for r in rows)
    print(text + f"\n# wrote {out / 'results.md'} and {out / 'results.csv'}")
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="launch experiments (names or globs) in dependency order")
    r.add_argument("experiments", nargs="+", help="names or globs like 'log/*'; key=value = train.py overrides")
    r.add_argument("--launcher", default="local", help=f"one of {sorted(LAUNCHERS)} (default local)")
    r.add_argument("--jobs", type=int, help="parallel jobs per level with --launcher joblib")
    r.add_argument("--budget", default="full", help="conf/budget preset: full, short, tiny")
    r.add_argument("--outputs", default="outputs", help="outputs root; runs go to <outputs>/sweeps/<budget>")
    r.add_argument("--with-deps", action="store_true", help="also run unfinished teachers / init_from rows")
    r.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    c = sub.add_parser("collect", help="results.md / results.csv from every summary.json below a dir")
    c.add_argument("dir")
    c.add_argument("--out", help="where to write results.md / results.csv (default: the dir)")
    sub.add_parser("list", help="print every experiment name with its description")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, rest = p.parse_known_args(argv)
    if rest and (args.command != "run" or any("=" not in a for a in rest)):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "run":
        args.experiments += rest  # train.py overrides given after the options
        return run(args)
    if args.command == "collect":
        collect(Path(args.dir), Path(args.out or args.dir))
        return 0
    for name in experiment_names():
        print(f"{name:24s} {OmegaConf.load(EXPERIMENTS / f'{name}.yaml').get('description', '')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        sys.exit(f"sweep.py: error: {err}")
