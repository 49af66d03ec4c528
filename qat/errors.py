"""One-line errors for the entry points: exit 2 for bad input, 1 for a crash (traceback only for crashes).

`HYDRA_FULL_ERROR=1` or a `debug=<config>` choice (conf/debug) re-raises instead, with the full traceback.
"""
import errno
import logging
import os
import sys
import traceback
from contextlib import contextmanager

BAD_INPUT, CRASH = 2, 1
# an OSError with one of these is the user's setup (a read-only or missing dir), not a crash
INPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}
HINTS = {errno.ENOSPC: "free space there or point paths.output_root at another filesystem",
         errno.EDQUOT: "free space there or point paths.output_root at another filesystem",
         errno.EACCES: "choose a writable paths.output_root (or hydra.run.dir)",
         errno.EROFS: "choose a writable paths.output_root (or hydra.run.dir)"}


def raised_on_purpose(exc: BaseException) -> bool:
    """True when the innermost frame is a `raise` statement (a check), not a failing call (a bug)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and (frames[-1].line or "").startswith("raise ")


def is_bad_input(exc: BaseException) -> bool:
    """ValueErrors, TypeErrors of the checks, config errors and setup OSErrors are the user's input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    if isinstance(exc, (ValueError, HydraException, OmegaConfBaseException)):
        return True  # Hydra's MissingConfigException is also an OSError
    if isinstance(exc, TypeError):
        return raised_on_purpose(exc)
    return isinstance(exc, OSError) and (exc.errno in INPUT_ERRNOS or isinstance(exc, FileNotFoundError))


def os_cause(exc: BaseException) -> OSError | None:
    """The OSError with an errno in `exc`'s cause/context chain (torch buries ENOSPC under a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(exc: BaseException) -> str:
    """`exc` as one line: its message (all lines joined), an OSError as '<path>: <cause>; <fix>'."""
    cause = os_cause(exc)
    if isinstance(exc, OSError) and cause is exc and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror or exc}"
        hint = HINTS.get(exc.errno)
        return text + (f"; {hint}" if hint else "")
    message = str(exc).split("\nConfig search path:")[0]  # Hydra appends its search path to a missing config
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if exc.__cause__ is not None and not isinstance(exc, OSError) and "hydra" in type(exc).__module__:
        text += " (" + one_line(exc.__cause__) + ")"  # Hydra puts the OmegaConf reason in the cause
    return f"{type(exc).__name__}: {text}" if not is_bad_input(exc) else text


def full_errors(argv: list[str] | None = None) -> bool:
    """True when the user asked for tracebacks: HYDRA_FULL_ERROR=1 or a debug=<config> override."""
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or any(
        a.lstrip("+").startswith("debug=") and a.split("=", 1)[1] not in ("", "null") for a in argv)


def to_log_files(line: str) -> None:
    """Append `line` to the log files of the root logger (the run's train.log), not to the console."""
    record = logging.LogRecord("qat", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def report(exc: BaseException) -> int:
    """Print `exc` as one `error:` line on stderr (crashes: after the traceback), log it; the exit code."""
    code = BAD_INPUT if is_bad_input(exc) else CRASH
    line = f"error: {one_line(exc)}"
    if code == CRASH and not (isinstance(exc, OSError) and exc.errno):  # an errno names the cause already
        trace = "".join(traceback.format_exception(exc))
        sys.stderr.write(trace)
        to_log_files(trace.rstrip())
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    to_log_files(line)
    return code


@contextmanager
def reported():
    """Turn an exception in the block into its one-line report and SystemExit(2 or 1)."""
    try:
        yield
    except Exception as exc:
        if full_errors():
            raise
        raise SystemExit(report(exc)) from None


def install_hydra_reporter() -> None:
    """Report Hydra's own errors (composition, unknown keys, bad group choices, run dir creation) as one line.

    Hydra prints these itself (message, often a stack, exit 1) from `hydra._internal.utils.run_and_report`;
    this swaps in `reported` for the call that composes and runs the job.
    """
    import hydra._internal.utils as hydra_utils
    original = hydra_utils.run_and_report

    def run_and_report(func):
        if full_errors():
            return original(func)
        with reported():
            return func()
    hydra_utils.run_and_report = run_and_report
