"""The model zoo: finished FP runs of our own, shipped in zoo/<name>/ and referenced as `zoo:<name>`.

    python -m qat.zoo list
    python -m qat.zoo publish outputs/train/<run dir> resnet20

A zoo entry is a run dir of its own: checkpoints/best.ckpt (the run's best weights, optimizer state
dropped), summary.json (the run's summary plus `sha256` of that file and the `command` that trained it; its paths
are relative to the entry).
"""
import argparse
import shlex
import sys
from pathlib import Path

from qat.callbacks import AtomicCheckpointIO, write_json_atomic
from qat.runs import ZOO, checkpoint_file, load_checkpoint, sha256_file, summaries, zoo_names

KEEP = ("state_dict", "qat", "epoch", "global_step")  # what a zoo checkpoint needs (no optimizer, no callbacks)
HOW_IT_RAN = ("resume=", "ckpt_path=")  # overrides of how a process continued, not of what it trained


def publish(run_dir: str | Path, name: str, zoo: Path = ZOO) -> Path:
    """Copy a finished run's best checkpoint (weights and recipe only) and summary into zoo/<name>/."""
    run_dir = Path(run_dir)
    found = [s for s in summaries(run_dir) if s["_path"].parent == run_dir]
    if not found or not found[0].get("finished"):
        raise ValueError(f"{run_dir} is not a finished run (no summary.json with finished=true): train it to the end "
                         "first")
    checkpoint = load_checkpoint(checkpoint_file(run_dir, "best"))
    if "qat" not in checkpoint:
        raise ValueError(f"{run_dir}: its checkpoint has no 'qat' recipe; only train.py / ptq.py runs can be published")
    target = zoo / name / "checkpoints" / "best.ckpt"
    AtomicCheckpointIO().save_checkpoint({k: checkpoint[k] for k in KEEP if k in checkpoint}, target)
    summary = {k: v for k, v in found[0].items() if not k.startswith("_")}
    overrides = [o for o in summary.get("overrides") or [] if not o.startswith(HOW_IT_RAN)]
    command = "python train.py " + shlex.join(overrides)
    # paths relative to the entry (a clone anywhere reads the same file); last.ckpt stays in the training run
    write_json_atomic(zoo / name / "summary.json", {**summary, "name": f"zoo/{name}", "output_dir": ".",
                                                    "best_ckpt": "checkpoints/best.ckpt", "last_ckpt": None,
                                                    "sha256": sha256_file(target), "command": command,
                                                    "trained_in": str(run_dir)})
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="copy a finished run into zoo/<name>/")
    pub.add_argument("run_dir")
    pub.add_argument("name")
    sub.add_parser("list", help="the zoo's models with their accuracy")
    args = p.parse_args(argv)
    if args.command == "publish":
        print(f"published {publish(args.run_dir, args.name)}")
        return 0
    for name in zoo_names():
        summary = summaries(ZOO / name)[0]
        print(f"zoo:{name:16s} {summary.get('model')}  best val acc {summary.get('best_val_acc')}  "
              f"({summary.get('command')})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"qat.zoo: error: {err}")
