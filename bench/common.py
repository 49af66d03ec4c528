"""Shared helpers of the bench scripts: machine facts, interleaved timing, peak memory, JSON/Markdown output.

Timing rule of every script: the variants run round-robin in the same process with the baseline between
any two of them; a variant's ratio is taken against the baseline measurements around it, per round, and
tables show the median over rounds. Absolute times are context only: the machine may be shared.
"""
import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch._C._profiler import _ExtraFields_Allocation

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20


def base_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run that only checks the script works")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json and <name>.md")
    parser.add_argument("--name", default=None, help="output file stem (default: the script's name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--keep-heap", action="store_true",
                        help="glibc malloc keeps freed memory mapped (see keep_heap), as a training process could")
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


def keep_heap() -> bool:
    """Make glibc malloc keep freed memory and serve blocks up to 32 MiB from the heap (mallopt).

    By default it unmaps the freed activations at the end of every step, and the next step faults
    fresh zeroed pages in again (tens of thousands of page faults per batch-128 step). Returns success.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(libc.mallopt(m_mmap_threshold, 2**25))


def start(args) -> dict:
    """Apply --threads and --keep-heap; the result skeleton: what was measured on and with which arguments."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_heap and not keep_heap():
        raise SystemExit("--keep-heap: mallopt failed (not glibc?)")
    machine = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
               "keep_heap": args.keep_heap, "loadavg_before": loadavg()}  # loadavg: did other jobs share it?
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(args.device)
    return {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str, repeat: int = 1) -> float:
    """Mean wall time of `repeat` calls of fn, in seconds (device work included)."""
    sync(device)
    begin = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - begin) / repeat


def interleave(fns: dict[str, Callable[[], object]], base: str, rounds: int, device: str, repeat: int = 1,
               warmup: int = 1, budget_s: float | None = None) -> dict[str, dict]:
    """Time every fn round-robin with the baseline between any two others: base, a, base, b, base, ...

    Returns {name: {"times": seconds per slot, "ratios": per-round time / base time}}, where a variant's
    base time is the mean of the two base measurements around it (so slow drifts of the machine cancel).
    With `budget_s`, rounds stop early once another one would end after budget_s (at least one runs).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    others = [name for name in fns if name != base]
    out = {name: {"times": [], "ratios": []} for name in fns}
    begin, done = time.perf_counter(), 0
    while done < rounds and not (budget_s and done and (time.perf_counter() - begin) * (done + 1) / done > budget_s):
        before = timed(fns[base], device, repeat)
        out[base]["times"].append(before)
        for name in others:
            t = timed(fns[name], device, repeat)
            after = timed(fns[base], device, repeat)
            out[name]["times"].append(t)
            out[name]["ratios"].append(t / ((before + after) / 2))
            out[base]["times"].append(after)
            before = after
        done += 1
    out[base]["ratios"] = [1.0] * done
    return out


def summary(values: list[float]) -> dict:
    """Median with the range (the numbers every table shows) and all values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": list(values)}


def spread(s: dict, digits: int = 3) -> str:
    """A summary as 'median [min-max]'."""
    return f"{s['median']:.{digits}f} [{s['min']:.2f}-{s['max']:.2f}]"


def peak_memory(fn: Callable[[], object], device: str) -> dict:
    """Peak bytes of tensor memory allocated by fn() and alive at the same time, above what existed before.

    CUDA: torch.cuda.max_memory_allocated. CPU: every allocation and free of PyTorch's CPU allocator is
    recorded with torch.profiler(profile_memory=True) and the running sum's maximum taken. This is exact
    for tensors and independent of what the process' heap caches (unlike RSS; tracemalloc does not see
    torch's allocations at all). Tensors that existed before fn and are freed inside it (e.g. the previous
    step's gradients on zero_grad) are not subtracted, so the figure is the gross working set of fn.
    """
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before, "method": "cuda_max_allocated"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if isinstance(event.extra_fields, _ExtraFields_Allocation) and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return {"peak_bytes": peak, "method": "profiler_cpu_allocations"}


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
    return "### Targets\n\n" + md_table(
        ["target", "measured", "limit", "met"],
        [[t["name"], None if t["value"] is None else f"{t['value']:.3f}", t["limit"], t["met"]] for t in targets])


def write_results(args, result: dict, markdown: str, default_name: str) -> None:
    """Write <out>/<name>.json and <out>/<name>.md; the loadavg after the run joins the machine facts."""
    m = result["machine"]
    m["loadavg_after"] = loadavg()
    head = (f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}), device {m['device']}"
            f"{', ' + m['gpu'] if 'gpu' in m else ''}, torch {m['torch']}{', --keep-heap' if m['keep_heap'] else ''}; "
            f"loadavg before {m['loadavg_before']}, after {m['loadavg_after']}.")
    name = args.name or default_name
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(f"{head}\n\n{markdown}\n")
    print(f"{head}\n\n{markdown}\n\nwrote {args.out / name}.json and .md")
