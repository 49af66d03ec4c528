"""Run dirs that cannot collide: an exclusively created dir name, and a lock file held while a process writes it."""
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path


LOCK_NAME = ".lock"
_claimed: dict[str, str] = {}  # base path -> the dir this process created for it


def unique_dir(base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... : the first name this call creates itself (os.mkdir is exclusive).

    Runs launched in the same second get distinct dirs. The answer is cached per process, because Hydra
    resolves `hydra.run.dir` more than once.
    """
    if base not in _claimed:
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            candidate = base if n == 1 else f"{base}-{n}"
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            _claimed[base] = candidate
            break
        else:
            raise FileExistsError(f"{base}: 10,000 run dirs of that name exist; clean up {Path(base).parent}")
    return _claimed[base]


class RunDirLocked(ValueError):
    """Another live process writes this run dir (a ValueError: the user's choice of dir, exit code 2)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}  # being written by its owner, or garbage: treated as held by an unknown process


def acquire(run_dir: str | Path) -> Path:
    """Create `<run_dir>/.lock` (pid, host, start time) exclusively; take over a lock whose process is dead.

    Raises RunDirLocked naming the holder (pid, host) when a live process, or one on another host, holds it.
    """
    lock = Path(run_dir) / LOCK_NAME
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # second try after removing a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # stale: its process died without releasing it
                continue
            raise RunDirLocked(
                f"run dir {run_dir} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('started', '?')}): wait for it to finish or choose another hydra.run.dir; "
                f"if that process is gone, delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise RunDirLocked(f"run dir {run_dir}: another process took over the stale lock {lock} at the same time")


def release(lock: Path) -> None:
    """Remove `lock` if this process still holds it."""
    if _holder(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


@contextmanager
def locked(run_dir: str | Path):
    """Hold the run dir's lock for the block."""
    lock = acquire(run_dir)
    try:
        yield lock
    finally:
        release(lock)
