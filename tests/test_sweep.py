"""sweep.py: dependency order, zoo dependencies, skip/resume, --jobs scheduling, bad input, collect (with the repro
seed table and verdicts); a slow end-to-end sweep with joblib."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # sweep.py lives at the repo root
import sweep  # noqa: E402
from qat import repro, runs  # noqa: E402


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], capture_output=True, text=True, cwd=ROOT)


def levels_of(stdout: str) -> list[list[str]]:
    return [line.split(": ", 1)[1].split() for line in stdout.splitlines() if line.startswith("# level")]


def fake_run(root: Path, name: str, finished: bool = True, **fields) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    summary = {"name": name, "finished": finished, "output_dir": str(run_dir), "model": "vit_6_4_32",
               "quant": None, "kd": "none", "overrides": [], **fields}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_dry_run_of_the_whole_log_puts_teachers_first(tmp_path):
    result = cli("run", "log/*", "--dry-run", "--outputs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    levels = levels_of(result.stdout)
    level_of = {name: i for i, level in enumerate(levels) for name in level}
    assert sorted(level_of) == [n for n in sweep.experiment_names() if n.startswith("log/")]
    for name, i in level_of.items():
        assert all(level_of[dep] < i for dep in sweep.dependencies(name)), name
    assert level_of["log/18376"] < level_of["log/24269"] < level_of["log/28353"]
    assert level_of["log/14289"] < level_of["log/24259"] < level_of["log/25863"]
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == len(levels) == 3
    sweep_dir = tmp_path.resolve() / "sweeps" / "full"
    for command, level in zip(commands, levels):
        assert f"experiment={','.join(level)}" in command
        for part in ("train.py -m", "hydra/launcher=basic", "budget=full", f"hydra.sweep.dir={sweep_dir}",
                     "'hydra.sweep.subdir=${name}'", f"paths.output_root={sweep_dir}", "resume=auto"):
            assert part in command
    assert not (tmp_path / "sweeps").exists(), "a dry run writes nothing"


def test_launcher_budget_and_overrides_reach_the_command(tmp_path):
    result = cli("run", "log/14289", "--dry-run", "--outputs", str(tmp_path), "--launcher", "joblib", "--jobs", "3",
                 "--budget", "tiny", "trainer=gpu")
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1]
    for part in ("hydra/launcher=joblib", "hydra.launcher.n_jobs=3", "budget=tiny", "experiment=log/14289 trainer=gpu",
                 f"{tmp_path.resolve()}/sweeps/tiny"):
        assert part in command


def test_finished_runs_are_skipped_and_unfinished_ones_resume(tmp_path):
    sweep_dir = tmp_path / "sweeps" / "full"
    fake_run(sweep_dir, "log/14289")
    (fake_run(sweep_dir, "log/17462", finished=False) / "checkpoints").mkdir()
    (sweep_dir / "log/17462/checkpoints/last.ckpt").write_bytes(b"")
    result = cli("run", "log/14289", "log/17462", "log/17463", "--dry-run", "--outputs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "# skip log/14289: finished" in result.stdout
    assert f"# resume log/17462 from {sweep_dir.resolve()}/log/17462/checkpoints/last.ckpt" in result.stdout
    assert levels_of(result.stdout) == [["log/17462", "log/17463"]]  # the teacher 14289 is done


def test_nothing_to_run_when_everything_finished(tmp_path):
    fake_run(tmp_path / "sweeps" / "full", "log/14289")
    result = cli("run", "log/14289", "--outputs", str(tmp_path))
    assert result.returncode == 0 and "nothing to run" in result.stdout


def test_unknown_experiment_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match=r"'log/2426' is not in conf/experiment; close matches: .*log/24269"):
        sweep.main(["run", "log/2426", "--dry-run", "--outputs", str(tmp_path)])
    result = cli("run", "24269", "--dry-run")
    assert result.returncode == 1 and "close matches: log/24269" in result.stderr


def test_missing_teacher_names_the_run_to_launch_first(tmp_path):
    with pytest.raises(ValueError, match=r"log/28353 needs log/24269, .*python sweep.py run log/24269.*--with-deps"):
        sweep.main(["run", "log/28353", "--dry-run", "--outputs", str(tmp_path)])
    result = cli("run", "log/28353", "--with-deps", "--dry-run", "--outputs", str(tmp_path))
    assert levels_of(result.stdout) == [["log/18376"], ["log/24269"], ["log/28353"]]
    result = cli("run", "log/25863", "--with-deps", "--dry-run", "--outputs", str(tmp_path))
    assert levels_of(result.stdout) == [["log/14289"], ["log/24259"], ["log/25863"]]


def test_a_finished_teacher_satisfies_the_dependency(tmp_path):
    fake_run(tmp_path / "sweeps" / "short", "log/24269")
    result = cli("run", "log/28353", "--dry-run", "--budget", "short", "--outputs", str(tmp_path))
    assert levels_of(result.stdout) == [["log/28353"]]
    with pytest.raises(ValueError, match="needs log/24269"):  # each budget has its own runs
        sweep.main(["run", "log/28353", "--dry-run", "--outputs", str(tmp_path)])


@pytest.mark.parametrize("args,match", [
    (["--launcher", "ray"], r"--launcher='ray' is not one of \['joblib', 'local', 'slurm'\]"),
    (["--budget", "huge"], r"--budget='huge' is not one of \['cpu', 'cpu_long', 'full', 'short', 'tiny'\]"),
    (["--jobs", "0"], r"--jobs=0: give the number of runs at once, 1 or more"),
    (["--launcher", "slurm", "--jobs", "2"], r"--jobs=2 needs --launcher local or joblib"),
])
def test_bad_run_options(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        sweep.main(["run", "log/14289", "--dry-run", "--outputs", str(tmp_path), *args])


def test_collect_writes_the_logs_table(tmp_path):
    fake_run(tmp_path, "log/14289", best_val_acc=92.5, final_val_acc=92.1, test_acc=92.5, epochs_completed=310,
             expected_acc=93.03, description="vit-6-4-32 fp | Baseline setting")
    fake_run(tmp_path, "log/51847", finished=False, best_val_acc=50.0, epochs_completed=12, expected_acc=None,
             description="vit-6-4-32 | lr 0.00075, wd 0.05")
    fake_run(tmp_path, "train", best_val_acc=80.0, description="", overrides=["quant=act2b", "kd=vit"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{")  # a run killed while writing: ignored
    assert sweep.main(["collect", str(tmp_path)]) == 0

    text = (tmp_path / "results.md").read_text()
    log_part, other_part = text.split("## Other runs")
    assert "| Network | Tricks | Accuracy | Run ID | Output Dir | Expected | Diff |" in log_part
    assert "| vit-6-4-32 fp | Baseline setting | 92.50 | 14289 | log/14289 | 93.03 | -0.53 |" in log_part
    assert "| vit-6-4-32 | lr 0.00075, wd 0.05 | 50.00 (epoch 12, unfinished) | 51847 | log/51847 |  |  |" in log_part
    assert "| vit_6_4_32 | quant=act2b kd=vit | 80.00 | train | train |  |  |" in other_part

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["name"] for r in rows] == ["log/14289", "log/51847", "train"]
    assert rows[0]["best_val_acc"] == "92.5" and rows[0]["test_acc"] == "92.5"
    assert float(rows[0]["diff"]) == pytest.approx(-0.53) and rows[0]["finished"] == "True"


def test_collect_to_another_dir_and_empty_dir(tmp_path):
    fake_run(tmp_path / "runs", "log/14289", best_val_acc=93.0, expected_acc=93.03,
             description="vit-6-4-32 fp | Baseline setting")
    sweep.main(["collect", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "results.md").is_file() and (tmp_path / "report" / "results.csv").is_file()
    with pytest.raises(ValueError, match="no summary.json below"):
        sweep.main(["collect", str(tmp_path / "report")])


@pytest.mark.slow
def test_two_quick_experiments_in_parallel_then_collect_and_resume(tmp_path):
    run = cli("run", "smoke/*", "--launcher", "joblib", "--jobs", "2", "--outputs", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "full"
    for name in ("smoke/act2b", "smoke/fp"):
        summary = json.loads((sweep_dir / name / "summary.json").read_text())
        assert summary["name"] == name and summary["finished"] is True
        assert (sweep_dir / name / "checkpoints" / "last.ckpt").is_file()
    assert "Joblib.Parallel(n_jobs=2" in run.stdout + run.stderr  # both jobs in one parallel pool
    table = (sweep_dir / "results.md").read_text()
    for row in (r"\| vit-2-4-32 aq \| act 2b, smoke test, 1 epoch of 2 batches \| \d+\.\d\d \| smoke/act2b \| "
                r"smoke/act2b \|", r"\| vit-2-4-32 fp \| .* \| smoke/fp \| smoke/fp \|"):
        assert re.search(row, table), table
    again = cli("run", "smoke/*", "--launcher", "joblib", "--outputs", str(tmp_path))
    assert "# skip smoke/act2b: finished" in again.stdout and "nothing to run" in again.stdout
    plotted = cli("collect", str(sweep_dir), "--plots")
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    report = (sweep_dir / "report" / "report.md").read_text()
    assert (sweep_dir / "report" / "curves.png").stat().st_size > 0 and "smoke/act2b" in report


@pytest.mark.parametrize("a,b,margin,label,diff,spread", [
    ([3.0, 4.0], [1.0, 1.0], 0.0, "holds", 2.5, 1.0),
    ([1.0, 1.0], [3.0, 4.0], 0.0, "does not hold", -2.5, 1.0),
    ([1.0, 2.0], [0.0, 0.5], 0.0, "not resolved", 1.25, 1.0),
    ([2.0, 3.0], [0.5, 0.5], 0.0, "not resolved", 2.0, 1.0),   # exactly twice the spread: not resolved
    ([0.5, 0.5], [2.0, 3.0], 0.0, "not resolved", -2.0, 1.0),
    ([90.0, 90.5], [91.0, 91.0], 1.0, "not resolved", -0.75, 0.5),  # 0.75 below, within 1 point: 0.25 < 1.0
    ([90.0, 90.0], [91.0, 91.0], 1.5, "holds", -1.0, 0.0),      # 1 point below, allowed 1.5
])
def test_verdict_against_twice_the_seed_spread(a, b, margin, label, diff, spread):
    assert repro.verdict(a, b, margin) == (label, diff, spread)


def test_findings_name_repro_rows_with_two_seeds():
    seeded = [n for n in sweep.experiment_names() if re.fullmatch(r"repro/.+_s\d", n)]
    rows = {n.removeprefix("repro/").rsplit("_s", 1)[0] for n in seeded}
    for finding in repro.FINDINGS:
        assert (finding.a is None) == (finding.b is None), finding.claim
        assert {finding.a, finding.b} - {None} <= rows, finding.claim
    assert all(f.a is not None for f in repro.FINDINGS)


def empty_zoo(monkeypatch, tmp_path, *entries: str) -> Path:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for entry in entries:  # what runs.zoo_names() looks for (tests/test_zoo.py publishes a real one)
        (zoo / entry).mkdir()
        (zoo / entry / "summary.json").write_text(json.dumps({"name": f"zoo/{entry}", "finished": True}))
    monkeypatch.setattr(runs, "ZOO", zoo)
    return zoo


def test_a_missing_zoo_teacher_stops_the_sweep_before_anything_starts(tmp_path, monkeypatch):
    zoo = empty_zoo(monkeypatch, tmp_path)
    with pytest.raises(ValueError) as err:
        sweep.main(["run", "repro/act2b_kd_s0", "repro/fp_s0", "--jobs", "2", "--outputs", str(tmp_path / "out")])
    assert str(err.value) == (
        f"repro/act2b_kd_s0 needs zoo:vit_6_4_32, which is not in the zoo ({zoo}): train and publish it first: "
        "python train.py experiment=zoo/vit_6_4_32 data.root=data/cifar10/cifar10-jpg "
        "hydra.run.dir=outputs/zoo/vit_6_4_32 && python -m qat.zoo publish outputs/zoo/vit_6_4_32 vit_6_4_32 "
        "(zoo/README.md)")
    assert not (tmp_path / "out").exists(), "no run dir, no log: nothing started"


def test_a_present_zoo_teacher_is_not_scheduled(tmp_path, monkeypatch, capsys):
    empty_zoo(monkeypatch, tmp_path, "vit_6_4_32")
    deps = sweep.pending(["repro/w2a2_kd_twostep_s1"], set(), with_deps=True, root=tmp_path)
    assert deps == {"repro/w2a2_kd_twostep_s1": ["repro/act2b_kd_s1"], "repro/act2b_kd_s1": []}
    assert sweep.main(["run", "repro/w2a2_kd_twostep_s1", "--with-deps", "--dry-run", "--outputs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert levels_of(out) == [["repro/act2b_kd_s1"], ["repro/w2a2_kd_twostep_s1"]] and "zoo:vit_6_4_32 " not in out


class FakeProcess:
    """A run that ends with `code` on its `polls`-th poll, recording start and end in `events`."""

    def __init__(self, name: str, events: list, polls: int, code: int = 0):
        self.name, self.events, self.polls, self.code = name, events, polls, code
        events.append(("start", name))

    def poll(self):
        self.polls -= 1
        if self.polls:
            return None
        self.events.append(("end", self.name))
        return self.code


def test_jobs_2_runs_two_at_once_and_starts_a_row_after_its_dependencies():
    deps = {"a": [], "b": [], "c": ["a"], "d": ["c", "b"], "e": []}
    polls, events = {"a": 1, "b": 3, "c": 1, "d": 1, "e": 1}, []
    codes = sweep.schedule(deps, lambda n: FakeProcess(n, events, polls[n]), jobs=2, wait=0)
    assert codes == {"a": 0, "c": 0, "b": 0, "e": 0, "d": 0}
    assert events == [("start", "a"), ("start", "b"), ("end", "a"), ("start", "c"), ("end", "c"), ("start", "e"),
                      ("end", "b"), ("end", "e"), ("start", "d"), ("end", "d")]


def test_a_failed_run_skips_its_dependents_and_the_others_go_on():
    deps = {"a": [], "c": ["a"], "d": ["c"], "e": []}
    events = []
    launch = lambda n: FakeProcess(n, events, 1, code=3 if n == "a" else 0)  # noqa: E731
    assert sweep.schedule(deps, launch, jobs=2, wait=0) == {"a": 3, "e": 0, "c": None, "d": None}
    assert ("start", "c") not in events and ("start", "d") not in events


def test_each_parallel_run_gets_one_thread_and_its_own_log(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_command", lambda name, *args: [
        sys.executable, "-c", "import os, sys; print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'], "
        "sys.argv[1])", name])
    assert sweep.launcher(tmp_path, "cpu_long", [])("repro/fp_s0").wait() == 0
    assert (tmp_path / "logs" / "repro" / "fp_s0.log").read_text() == "1 1 repro/fp_s0\n"


def test_jobs_2_dry_run_prints_one_resumable_command_per_run(tmp_path, monkeypatch, capsys):
    empty_zoo(monkeypatch, tmp_path, "vit_6_4_32")
    sweep_dir = tmp_path.resolve() / "sweeps" / "cpu_long"
    fake_run(sweep_dir, "repro/act2b_kd_s0")
    assert sweep.main(["run", "repro/act2b_kd_s0", "repro/w2a2_kd_twostep_s0", "repro/fp_s0", "--jobs", "2",
                       "--budget", "cpu_long", "--dry-run", "--outputs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "# skip repro/act2b_kd_s0: finished" in out
    assert levels_of(out) == [["repro/w2a2_kd_twostep_s0", "repro/fp_s0"]]
    command = next(line for line in out.splitlines() if "experiment=repro/fp_s0" in line)
    assert command == (f"OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 {sys.executable} {ROOT / 'train.py'} "
                       f"experiment=repro/fp_s0 budget=cpu_long hydra.run.dir={sweep_dir}/repro/fp_s0 "
                       f"paths.output_root={sweep_dir} resume=auto")


def test_collect_gives_each_repro_row_its_mean_seeds_and_findings(tmp_path):
    for seed, (kd, plain) in enumerate([(40.0, 35.0), (41.0, 35.5)]):
        fake_run(tmp_path, f"repro/act2b_kd_s{seed}", test_acc=kd, train_seconds=3600.0 + 60 * seed)
        fake_run(tmp_path, f"repro/act2b_s{seed}", test_acc=plain, train_seconds=3000.0)
    fake_run(tmp_path, "repro/act4b_kd_s0", test_acc=42.0, train_seconds=3900.0)
    fake_run(tmp_path, "repro/act4b_kd_s1", finished=False, epochs_completed=5, test_acc=None, train_seconds=1200.0)
    fake_run(tmp_path, "repro/fp_s0", test_acc=None)
    sweep.main(["collect", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "| Row | Mean | Seed 0 | Seed 1 | Wall time seed 0 | Wall time seed 1 |" in text
    assert "| act2b_kd | 40.50 | 40.00 | 41.00 | 60 min | 61 min |" in text
    assert "| act2b | 35.25 | 35.00 | 35.50 | 50 min | 50 min |" in text
    assert "| act4b_kd |  | 42.00 | epoch 5, unfinished | 65 min | 20 min |" in text
    assert "| fp |  | finished, no test_acc (test_after_fit=false?) | not run |  |  |" in text
    assert ("- KD helps A2 (act2b_kd vs act2b): holds, diff +5.25, seed spread 1.00 "
            "(log: 24259 90.83 vs 15133 89.48)") in text
    assert "- 4-bit > 2-bit activations (with KD) (act4b_kd vs act2b_kd): not run (log: " in text
    assert "- a stronger teacher helps weight-quantized students (w2_kd_resnet vs w2_kd): not run" in text


def test_archive_keeps_finished_rows_without_checkpoints_and_run_done_skips_them(tmp_path, monkeypatch, capsys):
    empty_zoo(monkeypatch, tmp_path, "vit_6_4_32")
    sweep_dir = tmp_path / "old" / "sweeps" / "cpu_long"
    fp = fake_run(sweep_dir, "repro/fp_s0", test_acc=55.0)
    (fp / "metrics.csv").write_text("epoch,val/acc1\n0,55.0\n")
    (fp / "checkpoints").mkdir()
    (fp / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    fake_run(sweep_dir, "repro/act2b_kd_s0", test_acc=50.0)
    fake_run(sweep_dir, "repro/act2b_s0", finished=False)
    archive = tmp_path / "results" / "runs"
    assert sweep.main(["archive", str(sweep_dir), "--out", str(archive)]) == 0
    assert sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file()) == [
        "repro/act2b_kd_s0/summary.json", "repro/fp_s0/metrics.csv", "repro/fp_s0/summary.json"]
    assert (archive / "repro/fp_s0/metrics.csv").read_text() == "epoch,val/acc1\n0,55.0\n"
    capsys.readouterr()
    args = ["run", "repro/fp_s0", "repro/act2b_s0", "--jobs", "2", "--budget", "cpu_long", "--dry-run",
            "--outputs", str(tmp_path / "new"), "--done", str(archive)]
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "# skip repro/fp_s0: finished" in out and levels_of(out) == [["repro/act2b_s0"]]
    with pytest.raises(ValueError, match=r"^repro/w2a2_kd_twostep_s0 needs the checkpoint of repro/act2b_kd_s0, "
                                         r"which finished in --done .*rerun repro/act2b_kd_s0 under --outputs"):
        sweep.main(args[:1] + ["repro/w2a2_kd_twostep_s0"] + args[3:])
    sweep.main(["collect", str(archive), "--out", str(tmp_path / "results")])
    assert "| fp |  | 55.00 | not run |" in (tmp_path / "results" / "results.md").read_text()
