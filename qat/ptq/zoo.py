"""`zoo:<name>` references: zoo/<name>/ is a run dir (summary.json + checkpoints/best.ckpt) of a shipped model."""
import json
from pathlib import Path

ZOO_ROOT = Path(__file__).resolve().parents[2] / "zoo"


def zoo_names(root: Path = ZOO_ROOT) -> list[str]:
    """Names of the zoo's run dirs (those with a checkpoints/best.ckpt)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "checkpoints" / "best.ckpt").is_file())


def resolve_zoo(ref: str, root: Path = ZOO_ROOT) -> str:
    """`zoo:<name>` -> the run dir zoo/<name>; anything else is returned unchanged."""
    if not str(ref).startswith("zoo:"):
        return str(ref)
    name = str(ref)[len("zoo:"):]
    names = zoo_names(root)
    if name not in names:
        raise FileNotFoundError(f"ckpt={ref}: no model {name!r} in the zoo ({root}); available: "
                                f"{names or 'none yet (train one with train.py and copy its run dir there)'}")
    return str(root / name)


def model_name_of(ref: str) -> str:
    """The model name recorded in a run's summary.json (for run dir names); 'model' when unknown."""
    try:
        path = Path(resolve_zoo(ref))
        run = path if path.is_dir() else path.parent.parent
        return str(json.loads((run / "summary.json").read_text())["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return "model"
