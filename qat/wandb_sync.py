"""Upload every offline W&B run below a folder: `python -m qat.wandb_sync outputs [--print] [wandb sync options]`.

Current wandb has no `wandb sync --sync-all`: `wandb sync` takes run folders. Offline runs live in
`<run dir>/wandb/offline-run-<time>-<id>/`; this finds them all (skipping those already synced, which
wandb marks with a `<run>.wandb.synced` file) and runs `wandb sync <folders>`. Other options go to
`wandb sync` unchanged (e.g. `--dry-run`, `-p <project>`, `-e <entity>`).
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path


def offline_runs(root: str | Path, include_synced: bool = False) -> list[Path]:
    """Every `wandb/offline-run-*` folder below `root` (symlinks such as `latest-run` not followed), sorted."""
    found = []
    for folder, dirs, _ in os.walk(root):
        if Path(folder).name != "wandb":
            continue
        for name in dirs:
            run = Path(folder) / name
            if name.startswith("offline-run-") and not run.is_symlink():
                if include_synced or not any(run.glob("*.wandb.synced")):
                    found.append(run)
    return sorted(found)


def sync_command(runs: list[Path], options: list[str] = ()) -> list[str]:
    """The `wandb sync` command line (run with this interpreter's wandb) that uploads `runs`."""
    return [sys.executable, "-m", "wandb", "sync", *options, *map(str, runs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat.wandb_sync", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("outputs"), help="folder to search (outputs)")
    parser.add_argument("--print", action="store_true", help="print the wandb sync command instead of running it")
    parser.add_argument("--include-synced", action="store_true", help="also runs already synced")
    args, options = parser.parse_known_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a folder: give the outputs root (default: outputs)")
    runs = offline_runs(args.root, args.include_synced)
    if not runs:
        parser.error(f"no offline W&B runs to sync under {args.root} (looked for */wandb/offline-run-* without a "
                     "*.wandb.synced marker; --include-synced to sync them again)")
    command = sync_command(runs, options)
    print(f"{len(runs)} offline run(s): wandb " + " ".join(command[3:]), flush=True)
    return 0 if args.print else subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
