"""Run rows of the experiment log by name, teachers first, and collect the results into the log's table.

    python sweep.py run 'log/*' --dry-run                     # print the ordered commands
    python sweep.py run log/28353 --with-deps --launcher joblib --budget short trainer=gpu
    python sweep.py run 'repro/*_s?' --jobs 2 --budget cpu_long  # two runs at once, one thread each
    python sweep.py collect outputs/sweeps/full               # -> results.md, results.csv
    python sweep.py archive outputs/sweeps/cpu_long --out bench/results/runs   # finished rows, no checkpoints
    python sweep.py run 'repro/*_s?' --done bench/results/runs ...             # skip the archived rows

Each dependency level (rows whose teachers / init_from runs are finished) is one
`train.py -m experiment=a,b,...` multirun through the chosen Hydra launcher, so a level runs in parallel
with joblib or SLURM. With the local launcher and --jobs N > 1, every run is its own train.py process
(OMP_NUM_THREADS=MKL_NUM_THREADS=1, console output in <sweep dir>/logs/<name>.log), up to N at once, each
started as soon as its dependencies finished. Run dirs are stable (<outputs>/sweeps/<budget>/<name>):
re-running the same command skips rows with a finished summary.json and resumes the others from last.ckpt
(resume=auto). A `zoo:<name>` dependency is not a run: zoo/<name> must exist, else nothing starts.
`archive` keeps what a finished run reports (summary.json, metrics.csv, train.log, hparams.yaml) where outputs/
does not last, and `run --done <archive>` skips those rows; a row that needs an archived row's checkpoint (its
teacher or init_from run) is refused until that row is rerun under --outputs.
Arguments with '=' are passed to train.py as overrides.
"""
import argparse
import csv
import difflib
import fnmatch
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from qat import repro, runs
from qat.report import write_report
from qat.runs import summaries

ROOT = Path(__file__).resolve().parent
EXPERIMENTS = ROOT / "conf" / "experiment"
BUDGETS = ROOT / "conf" / "budget"
LAUNCHERS = {"local": "basic", "joblib": "joblib", "slurm": "slurm"}  # --launcher -> hydra/launcher
COLUMNS = ["Network", "Tricks", "Accuracy", "Run ID", "Output Dir", "Expected", "Diff"]
CSV_FIELDS = ["name", "network", "tricks", "best_val_acc", "final_val_acc", "test_acc", "expected_acc", "diff",
              "epochs_completed", "train_seconds", "finished", "model", "quant", "kd", "output_dir"]


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


ARCHIVED = ("summary.json", "metrics.csv", "train.log", "hparams.yaml")


def archive(root: Path, out: Path) -> list[str]:
    """Copy ARCHIVED of every finished run below `root` to out/<same relative dir> (each file written atomically);
    the run dirs archived, relative to `root`."""
    root, names = Path(root).resolve(), []
    for summary in summaries(root, finished=True):
        run_dir = summary["_path"].parent
        dest = Path(out) / run_dir.relative_to(root)
        dest.mkdir(parents=True, exist_ok=True)
        for file in ARCHIVED:
            if (run_dir / file).is_file():
                tmp = dest / f".{file}.tmp"
                shutil.copyfile(run_dir / file, tmp)
                os.replace(tmp, dest / file)
        names.append(run_dir.relative_to(root).as_posix())
    return names


def check_archived_deps(deps: dict[str, list[str]], archived: set[str], archive_dirs: list[str]):
    """A row to run whose dependency finished only in an archive (no checkpoint there): one line, before any work."""
    for name, needed in deps.items():
        for dep in needed:
            if dep in archived:
                raise ValueError(f"{name} needs the checkpoint of {dep}, which finished in --done "
                                 f"{' '.join(archive_dirs)} (no checkpoints kept there): rerun {dep} under --outputs "
                                 f"with {name}, e.g. python sweep.py run {dep} {name} (without --done)")


def pending(selected: list[str], done: set[str], with_deps: bool, root: Path) -> dict[str, list[str]]:
    """name -> its experiment dependencies for every experiment still to run; `zoo:` entries are not runs."""
    names = set(experiment_names())
    deps: dict[str, list[str]] = {}
    queue = [n for n in selected if n not in done]
    while queue:
        name = queue.pop(0)
        if name in deps:
            continue
        deps[name] = [d for d in dependencies(name) if not d.startswith("zoo:")]
        for dep in deps[name]:
            if dep not in names:
                raise ValueError(f"{name}: depends_on entry {dep!r} is not an experiment config")
            if dep in done or dep in selected or dep in deps:
                continue
            if not with_deps:
                raise ValueError(f"{name} needs {dep}, which has no finished run under {root} and is not part of "
                                 f"this launch: run `python sweep.py run {dep}` first, or add --with-deps")
            queue.append(dep)
    return deps


def order(deps: dict[str, list[str]], done: set[str]) -> list[list[str]]:
    """Dependency levels of `deps`; level k only needs levels < k or `done` runs."""
    levels, placed, todo = [], set(done), list(deps)
    while todo:
        level = [n for n in todo if all(d in placed for d in deps[n])]
        if not level:
            raise ValueError(f"depends_on forms a cycle among {todo}")
        levels.append(level)
        placed |= set(level)
        todo = [n for n in todo if n not in placed]
    return levels


def plan(selected: list[str], done: set[str], with_deps: bool, root: Path) -> list[list[str]]:
    """Dependency levels of the experiments still to run."""
    return order(pending(selected, done, with_deps, root), done)


def zoo_command(entry: str) -> str:
    """How to train and publish zoo/<entry> (zoo/README.md)."""
    recipe = f"experiment=zoo/{entry}" if (EXPERIMENTS / "zoo" / f"{entry}.yaml").is_file() else "<its recipe>"
    return (f"python train.py {recipe} data.root=data/cifar10/cifar10-jpg hydra.run.dir=outputs/zoo/{entry} && "
            f"python -m qat.zoo publish outputs/zoo/{entry} {entry}")


def missing_zoo(names: list[str]) -> list[str]:
    """One line per `zoo:` dependency of `names` that the zoo lacks: the row, the entry, the command to train it."""
    needed: dict[str, list[str]] = {}
    for name in names:
        for dep in dependencies(name):
            if dep.startswith("zoo:") and dep.split(":", 1)[1] not in runs.zoo_names():
                needed.setdefault(dep.split(":", 1)[1], []).append(name)
    return [f"{rows[0]}{f' (and {len(rows) - 1} more rows)' if len(rows) > 1 else ''} needs zoo:{entry}, which is "
            f"not in the zoo ({runs.ZOO}): train and publish it first: {zoo_command(entry)} (zoo/README.md)"
            for entry, rows in needed.items()]


def commands(levels: list[list[str]], sweep_dir: Path, launcher: str, budget: str, jobs: int | None,
             overrides: list[str]) -> list[list[str]]:
    """One `train.py -m` multirun per level, every run in the stable dir <sweep_dir>/<name>."""
    base = [sys.executable, str(ROOT / "train.py"), "-m", f"hydra/launcher={LAUNCHERS[launcher]}", f"budget={budget}",
            f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${name}", f"paths.output_root={sweep_dir}",
            "resume=auto"]
    if jobs is not None and launcher == "joblib":
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
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs={jobs}: give the number of runs at once, 1 or more (default 1)")
    if jobs is not None and launcher == "slurm":
        raise ValueError(f"--jobs={jobs} needs --launcher local or joblib (got 'slurm': SLURM schedules the jobs)")


def run_command(name: str, sweep_dir: Path, budget: str, overrides: list[str]) -> list[str]:
    """One run of one experiment in its stable dir <sweep_dir>/<name> (with --jobs N > 1)."""
    return [sys.executable, str(ROOT / "train.py"), f"experiment={name}", f"budget={budget}",
            f"hydra.run.dir={sweep_dir / name}", f"paths.output_root={sweep_dir}", "resume=auto", *overrides]


def schedule(deps: dict[str, list[str]], launch, jobs: int, wait: float = 10.0) -> dict[str, int | None]:
    """Start each run once its dependencies among `deps` exited 0, at most `jobs` at a time; `launch(name)` returns
    a process (poll() is None while it runs). name -> exit code, None where a dependency failed (not started)."""
    codes: dict[str, int | None] = {}
    running: dict = {}
    todo = sorted(deps, key=lambda n: -sum(n in d for d in deps.values()))  # rows that others wait for first
    while todo or running:
        for name in list(todo):
            inner = [d for d in deps[name] if d in deps]
            if any(d in codes and codes[d] != 0 for d in inner):
                codes[name] = None
                todo.remove(name)
            elif len(running) < jobs and all(codes.get(d) == 0 for d in inner):
                running[name] = launch(name)
                todo.remove(name)
        ended = {n: c for n, c in ((n, p.poll()) for n, p in running.items()) if c is not None}
        for name, code in ended.items():
            codes[name] = code
            del running[name]
            print(f"# {name} exited {code}", flush=True)
        if running and not ended:
            time.sleep(wait)
    return codes


def launcher(sweep_dir: Path, budget: str, overrides: list[str]):
    """launch(name): a one-thread train.py process of that experiment, its console output in logs/<name>.log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def launch(name: str) -> subprocess.Popen:
        log = sweep_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"# start {name} (console output: {log})", flush=True)
        with open(log, "a") as out:
            return subprocess.Popen(run_command(name, sweep_dir, budget, overrides), stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
    return launch


def run_jobs(deps: dict[str, list[str]], levels: list[list[str]], sweep_dir: Path, args, overrides: list[str]) -> int:
    """--jobs N > 1 with the local launcher: every run its own one-thread train.py, N at a time."""
    for i, level in enumerate(levels):
        print(f"# level {i}: {' '.join(level)}")
        for name in level:
            print("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 " + shlex.join(run_command(name, sweep_dir, args.budget,
                                                                                   overrides)), flush=True)
    if args.dry_run:
        return 0
    codes = schedule(deps, launcher(sweep_dir, args.budget, overrides), args.jobs)
    failed = {n: c for n, c in codes.items() if c != 0}
    for name, code in failed.items():
        why = "a dependency failed" if code is None else f"exit {code}, see {sweep_dir / 'logs' / name}.log"
        print(f"# {name} did not finish ({why}); re-run the same command to resume", file=sys.stderr)
    return 1 if failed else 0


def run_levels(levels: list[list[str]], sweep_dir: Path, args, overrides: list[str]) -> int:
    """One `train.py -m` multirun per level through the Hydra launcher, in order."""
    cmds = commands(levels, sweep_dir, args.launcher, args.budget, args.jobs, overrides)
    for i, (level, cmd) in enumerate(zip(levels, cmds)):
        print(f"# level {i}: {' '.join(level)}")
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            code = subprocess.call(cmd)
            if code:
                print(f"# level {i} failed (exit {code}); re-run the same command to resume", file=sys.stderr)
                return code
    return 0


def run(args: argparse.Namespace) -> int:
    check_run_args(args.launcher, args.budget, args.jobs, args.dry_run)
    overrides = [a for a in args.experiments if "=" in a]
    selected = select([a for a in args.experiments if "=" not in a], experiment_names())
    sweep_dir = Path(args.outputs).resolve() / "sweeps" / args.budget
    done = finished_runs(sweep_dir)
    archived = {n: p for d in args.done for n, p in finished_runs(Path(d)).items() if n not in done}
    finished = {**archived, **done}  # name -> summary.json; a run under --outputs wins over its archived copy
    for name in selected:
        if name in finished:
            print(f"# skip {name}: finished ({finished[name]})")
    deps = pending(selected, set(finished), args.with_deps, sweep_dir)
    check_archived_deps(deps, set(archived), args.done)
    for problem in missing_zoo(list(deps)):
        if not args.dry_run:
            raise ValueError(problem)
        print(f"# {problem}")
    for name in deps:
        last = sweep_dir / name / "checkpoints" / "last.ckpt"
        if last.is_file():
            print(f"# resume {name} from {last}")
    levels = order(deps, set(finished))
    if not levels:
        print("# nothing to run: every selected experiment has finished")
    parallel = args.launcher == "local" and (args.jobs or 1) > 1
    code = (run_jobs(deps, levels, sweep_dir, args, overrides) if parallel else
            run_levels(levels, sweep_dir, args, overrides))
    if not code and not args.dry_run and summaries(sweep_dir):
        collect(sweep_dir, sweep_dir)
    return code


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


def collect(root: Path, out: Path, plots: bool = False) -> list[dict]:
    """Write <out>/results.md and <out>/results.csv for every summary.json below `root`; print the Markdown;
    with `plots`, also qat.report's PNGs and report.md of every run in <out>/report."""
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
    seeded = repro.seed_rows(runs)
    if seeded:
        text += (f"\n## Reproduction rows (test accuracy, seeds {repro.SEEDS})\n\n{repro.seed_table(seeded)}\n"
                 f"\n## The log's findings (qat/repro.py)\n\n{repro.findings_text(seeded)}\n")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(r["csv"] for r in rows)
    print(text + f"\n# wrote {out / 'results.md'} and {out / 'results.csv'}")
    if plots:
        write_report([s["_path"].parent for s in runs if (s["_path"].parent / "metrics.csv").is_file()], out / "report")
        print(f"# plots and report.md in {out / 'report'}")
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="launch experiments (names or globs) in dependency order")
    r.add_argument("experiments", nargs="+", help="names or globs like 'log/*'; key=value = train.py overrides")
    r.add_argument("--launcher", default="local", help=f"one of {sorted(LAUNCHERS)} (default local)")
    r.add_argument("--jobs", type=int, help="runs at once (default 1): local launcher, N > 1: one-thread train.py "
                   "processes, each started when its dependencies finished; joblib: n_jobs per level")
    r.add_argument("--budget", default="full", help="conf/budget preset: full, short, tiny, cpu, cpu_long")
    r.add_argument("--outputs", default="outputs", help="outputs root; runs go to <outputs>/sweeps/<budget>")
    r.add_argument("--with-deps", action="store_true", help="also run unfinished teachers / init_from rows")
    r.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    r.add_argument("--done", action="append", default=[], metavar="DIR",
                   help="finished runs archived below DIR (sweep.py archive) count as done; repeatable")
    c = sub.add_parser("collect", help="results.md / results.csv from every summary.json below a dir")
    c.add_argument("dir")
    c.add_argument("--out", help="where to write results.md / results.csv (default: the dir)")
    c.add_argument("--plots", action="store_true", help="also curves, lr, quantizer heatmaps and report.md")
    a = sub.add_parser("archive", help="copy what finished runs report (no checkpoints) to another dir")
    a.add_argument("dir")
    a.add_argument("--out", required=True, help="the archive, e.g. bench/results/<set>/runs")
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
        collect(Path(args.dir), Path(args.out or args.dir), plots=args.plots)
        return 0
    if args.command == "archive":
        names = archive(Path(args.dir), Path(args.out))
        print(f"# archived {len(names)} finished runs to {args.out}: {' '.join(sorted(names))}")
        return 0
    for name in experiment_names():
        print(f"{name:24s} {OmegaConf.load(EXPERIMENTS / f'{name}.yaml').get('description', '')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        sys.exit(f"sweep.py: error: {err}")
