"""The one logger of spotlm: `get_logger(__name__)` everywhere, one short line per event.

A console line reads `HH:MM:SS message` (warnings and errors also name their level); with
`--verbose` (SPOTLM_VERBOSE=1) every line names its level and module. Ray workers' output stays
in Ray's log files unless verbose, so `forward_logs` sends their spotlm records to the driver
(`app.ray_env.relay_worker_logs`), which logs them as its own.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

ROOT = "spotlm"
_FORMATS = {
    "info": logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"),
    "warning": logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"),
    "verbose": logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"),
}


def verbose() -> bool:
    """Whether the user asked for Ray's own log lines and module names (`--verbose` sets SPOTLM_VERBOSE=1)."""
    return os.environ.get("SPOTLM_VERBOSE", "") not in ("", "0")


class _Formatter(logging.Formatter):
    """Picks the format per record: `--verbose` may be parsed after the first logger was made."""

    def format(self, record: logging.LogRecord) -> str:
        key = "verbose" if verbose() else "warning" if record.levelno >= logging.WARNING else "info"
        return _FORMATS[key].format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (init_ray may point it elsewhere than at first)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the `spotlm` hierarchy, configured once to write to stderr."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("SPOTLM_LOG_LEVEL", "INFO"))
        root.propagate = False
    return root.getChild(name.split(".", 1)[-1] if name.startswith(("app.", "jobs.", "index.")) else name)


class Progress:
    """Progress over `total` units as `label: done/total unit` lines, at most one every `every_s`
    seconds; a stage that ran that long also logs its end, a shorter one stays silent."""

    def __init__(self, log: logging.Logger, label: str, total: int, unit: str, every_s: float = 10.0):
        self.log, self.label, self.total, self.unit, self.every_s = log, label, total, unit, every_s
        self.done, self._shown = 0, False
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s or (self._shown and self.done >= self.total):
            self._last, self._shown = now, True
            self.log.info("%s: %d/%d %s", self.label, self.done, self.total, self.unit)


# ---------------------------------------------------------------- Ray workers' records on the driver's console

class _Forward(logging.Handler):
    """Sends each record to the driver's sink without waiting for it."""

    def __init__(self, sink: Any, level: int):
        super().__init__(level)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.put.remote(record.name, record.levelno, record.getMessage(), record.created)
        except Exception:
            self.handleError(record)


def forward_logs(sink: Any, level: int = logging.INFO) -> None:
    """In a Ray worker: send this process's spotlm records at `level` and above to the driver's
    `sink` (from `app.ray_env.relay_worker_logs`) as well as to its own log file."""
    root = logging.getLogger(ROOT)
    get_logger(ROOT)  # the usual handler first: the worker's log file keeps every line
    for h in [h for h in root.handlers if isinstance(h, _Forward)]:
        root.removeHandler(h)  # one relay per process, also when a function runs here again
    root.addHandler(_Forward(sink, level))
