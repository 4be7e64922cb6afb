"""Start or join Ray: a cluster when one is given (RAY_ADDRESS, `ray job submit`), else a local Ray; and
carry the Ray workers' spotlm log records to the driver's console (`relay_worker_logs`)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from app.log import get_logger, verbose as verbose_from_env

log = get_logger(__name__)
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


def init_ray(num_cpus: int | None = None, verbose: bool | None = None) -> None:
    """Connect to Ray once per process.

    Inside a Ray job or with RAY_ADDRESS set this joins that cluster. Otherwise it starts a local
    Ray in-process with at least 4 logical CPUs: on 2-core machines actors holding every CPU
    would starve Ray Data's read tasks (the 2-CPU deadlock). Workers get the project on their
    PYTHONPATH, since they run in another working directory.

    Unless `verbose` (default: `--verbose`, i.e. SPOTLM_VERBOSE=1), Ray's own output stays in its
    log files (/tmp/ray/session_*/logs) and the console shows spotlm's lines only (`quiet_ray`,
    `native_stderr_to_file`).
    """
    import ray

    if ray.is_initialized():
        return
    loud = verbose_from_env() if verbose is None else verbose
    # Workers' stdout/stderr (Ray Train's controller and workers, Serve's actors) stay in their
    # files; Ray's driver-side loggers print errors only.
    console = {} if loud else {"log_to_driver": False, "logging_level": logging.ERROR}
    if not loud:  # nor "Task ... failed. There are infinite retries remaining" for a task Ray retries
        os.environ.setdefault("RAY_enable_output_error_log_if_still_retry", "0")
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(**console)
    else:
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        log.info("starting a local Ray (%d logical CPUs)", cpus)
        path = os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}}, **console)
    if not loud:
        quiet_ray()
        native_stderr_to_file()


def native_stderr_to_file() -> None:
    """Send what Ray's C++ core in this driver writes to file descriptor 2 (its ERROR lines, e.g.
    core_worker.cc's about every Ray Data actor pool; workers' go to their .err files) to
    `driver-<pid>.err` in the session's log directory, keeping Python's `sys.stderr` on the console."""
    import ray

    node = ray._private.worker._global_node  # this machine's Ray node, as Ray Data finds its log directory
    try:
        moved = sys.stderr.fileno() != 2  # moved before in this process, or stderr is not the process's own
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (captured output)
        moved = True
    if node is None or moved:
        return
    logs = node.get_logs_dir_path()
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors)
    fd = os.open(os.path.join(logs, f"driver-{os.getpid()}.err"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = console


def quiet_ray() -> None:
    """Keep the console of Ray Data and Ray Serve in this driver to errors: they log through their
    own loggers and console handlers (their log files keep every line), and Ray Data draws no
    progress bars and prints no execution plan (the jobs log their own progress)."""
    import ray.data
    import ray.serve  # its driver logger is configured, at INFO, on import

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.serve"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


# ---------------------------------------------------------------- Ray workers' log records on this console

class _LogSink:
    """Ray actor: holds the records workers forward until the driver takes them."""

    def __init__(self):
        self._records: list[tuple[str, int, str, float]] = []

    def put(self, name: str, level: int, message: str, created: float) -> None:
        self._records.append((name, level, message, created))

    def take(self) -> list[tuple[str, int, str, float]]:
        records, self._records = self._records, []
        return records


@contextlib.contextmanager
def relay_worker_logs(poll_s: float = 0.25) -> Iterator[Any]:
    """In the driver: yields a sink for `forward_logs` whose records this process logs as its own,
    or None when verbose (Ray then copies the workers' whole output to this console)."""
    if verbose_from_env():
        yield None
        return
    import ray

    sink = ray.remote(num_cpus=0)(_LogSink).remote()
    stop = threading.Event()

    def pump() -> None:
        while True:
            stopping = stop.wait(poll_s)
            try:
                records = ray.get(sink.take.remote())
            except ray.exceptions.RayError:  # the sink is gone (Ray shutting down): nothing more to show
                return
            for name, level, message, created in records:
                record = logging.makeLogRecord({"name": name, "levelno": level, "msg": message,
                                                "levelname": logging.getLevelName(level), "created": created})
                logging.getLogger(name).handle(record)
            if stopping:
                return

    thread = threading.Thread(target=pump, name="spotlm-log-relay", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join()
        ray.kill(sink)
