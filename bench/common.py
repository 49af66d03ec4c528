"""Shared helpers of the bench scripts: machine facts, interleaved timing, peak memory, JSON/Markdown output.

Timing rule of every script: the variants run round-robin in the same process, each round measures
all of them, and results are medians over rounds; ratios are taken within a round, then the median.
"""
import argparse
import gc
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20


def base_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run that only checks the script works")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json and <name>.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default=None, help="output file stem (default: the script's name)")
    return parser


def csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """What the numbers were measured on; loadavg shows whether others shared the machine."""
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device,
            "loadavg_before": loadavg()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str, repeat: int = 1) -> float:
    """Mean wall time of `repeat` calls of fn, in seconds (device work included)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def interleave(fns: dict[str, Callable[[], object]], base: str, rounds: int, device: str, repeat: int = 1,
               warmup: int = 1) -> dict[str, dict]:
    """Time every fn round-robin with the baseline between any two others: base, a, base, b, base, ...

    Returns {name: {"times": per-round seconds, "ratios": per-round time / base time}}, where a variant's
    base time is the mean of the two base measurements around it (so slow drifts of the machine cancel).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    others = [name for name in fns if name != base]
    out = {name: {"times": [], "ratios": []} for name in fns}
    for _ in range(rounds):
        before = timed(fns[base], device, repeat)
        out[base]["times"].append(before)
        for name in others:
            t = timed(fns[name], device, repeat)
            after = timed(fns[base], device, repeat)
            out[name]["times"].append(t)
            out[name]["ratios"].append(t / ((before + after) / 2))
            out[base]["times"].append(after)
            before = after
    out[base]["ratios"] = [1.0] * rounds
    return out


def summary(values: list[float]) -> dict:
    """Median with the range (the numbers every table shows) and all values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": list(values)}


# ---- memory ---------------------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_memory(fn: Callable[[], object], device: str) -> dict:
    """Peak memory of fn() above the memory in use when it starts, in bytes.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process' resident-set high-water mark (VmHWM), reset
    first through /proc/self/clear_refs; run it in a fresh process (`isolated`) so freed-but-cached heap
    of earlier work does not hide allocations.
    """
    gc.collect()
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - start, "method": "cuda_max_allocated"}
    start = _proc_status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        method = "rss_hwm"
    except OSError:
        method = "rss_hwm_since_start"  # could not reset: the peak may predate fn
    fn()
    return {"peak_bytes": (_proc_status_kb("VmHWM") - start) * 1024, "method": method}


def isolated(fn: Callable, *args):
    """fn(*args) in a fresh spawned Python process (fn must be importable at module level)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        return pool.submit(fn, *args).result()


# ---- output ---------------------------------------------------------------------------------------------
def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def target(name: str, value: float | None, limit: float, higher_is_better: bool = False) -> dict:
    met = None if value is None else (value >= limit if higher_is_better else value <= limit)
    return {"name": name, "value": value, "limit": ("≥ " if higher_is_better else "≤ ") + f"{limit:g}", "met": met}


def targets_table(targets: list[dict]) -> str:
    return md_table(["target", "measured", "limit", "met"],
                    [[t["name"], None if t["value"] is None else f"{t['value']:.3f}", t["limit"], t["met"]]
                     for t in targets])


def write_results(out: Path, name: str, result: dict, markdown: str) -> None:
    """Write <out>/<name>.json and <out>/<name>.md; loadavg after the run is added to the machine facts."""
    result["machine"]["loadavg_after"] = loadavg()
    m = result["machine"]
    head = (f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}), device {m['device']}"
            f"{', ' + m['gpu'] if 'gpu' in m else ''}, torch {m['torch']}; "
            f"loadavg before {m['loadavg_before']}, after {m['loadavg_after']}.")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(f"{head}\n\n{markdown}\n")
    print(f"{head}\n\n{markdown}\n\nwrote {out / name}.json and .md")
