"""Preemption notices Ray does not see, for a training worker: SIGTERM and the AWS spot interruption notice.
The training loop asks `should_stop()` at every step boundary, saves a checkpoint and returns; the driver then
starts the run again (app/train/run.py). Ray's own node-drain notice is Ray's to handle: the loop asks
`ray.train.get_preemption_info()`, saves a checkpoint and trains on, and Ray restarts the group when the node goes.
"""
from __future__ import annotations

import signal
import threading
import urllib.error
import urllib.request
from typing import Any, Callable

from app.log import get_logger

log = get_logger(__name__)

AWS_METADATA = "http://169.254.169.254"  # the instance metadata service (only reachable on EC2)


def on_aws() -> bool:
    """Whether this is an EC2 instance (by its DMI data; no network call)."""
    for f in ("/sys/devices/virtual/dmi/id/sys_vendor", "/sys/devices/virtual/dmi/id/board_asset_tag"):
        try:
            with open(f) as fh:
                text = fh.read()
        except OSError:
            continue
        if "Amazon" in text or text.startswith("i-"):
            return True
    return False


def aws_spot_notice(endpoint: str = AWS_METADATA, timeout: float = 1.0) -> bool:
    """True once AWS has scheduled this spot instance's interruption (IMDSv2, then v1)."""
    headers = {}
    try:
        req = urllib.request.Request(f"{endpoint}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            headers["X-aws-ec2-metadata-token"] = r.read().decode()
    except (urllib.error.URLError, OSError):
        pass  # IMDSv1 instances answer without a token
    try:
        req = urllib.request.Request(f"{endpoint}/latest/meta-data/spot/instance-action", headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200  # 404 until an interruption is scheduled
    except (urllib.error.URLError, OSError):
        return False


class PreemptionWatcher:
    """Collects preemption notices into one flag; `should_stop()` is cheap and thread-safe."""

    def __init__(self, poll_s: float = 5.0, aws_endpoint: str | None = None, aws_auto: bool = True):
        self._flag = threading.Event()
        self.reason = ""
        self._stop = threading.Event()
        self._on_close: list[Callable[[], None]] = []
        if aws_endpoint is None and aws_auto and on_aws():
            aws_endpoint = AWS_METADATA
        if aws_endpoint:
            threading.Thread(target=self._poll_aws, args=(aws_endpoint, poll_s), daemon=True,
                             name="spot-notice").start()

    def notify(self, reason: str, quiet: bool = False) -> None:
        """Record a notice (the first one's reason stays) and log it, unless `quiet`."""
        if not self._flag.is_set():
            self.reason = reason
            if not quiet:
                log.warning("preemption notice (%s): checkpointing at the next step boundary", reason)
            self._flag.set()

    def should_stop(self) -> bool:
        """Whether a notice came in."""
        return self._flag.is_set()

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call `fn` at `close()` (last registered, first called)."""
        self._on_close.append(fn)

    def close(self) -> None:
        """Stop watching: no more polling, and SIGTERM gets its earlier handler back."""
        self._stop.set()
        while self._on_close:
            self._on_close.pop()()

    def _poll_aws(self, endpoint: str, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            if aws_spot_notice(endpoint):
                self.notify("aws spot interruption notice")
                return


# This process's SIGTERM handler while a training loop runs: the watcher it notifies, and the
# handler it replaced (given back when the loop ends)
_WATCHER: PreemptionWatcher | None = None
_PREVIOUS: Any = None


def _on_sigterm(signum, frame) -> None:
    # Quiet: the handler runs inside Ray's task loop on the worker's main thread, where a log record's relay
    # to the driver (a Ray call: app.log.forward_logs) crashes the worker. The training loop logs the notice.
    if _WATCHER is not None:
        _WATCHER.notify(f"signal {signal.Signals(signum).name}", quiet=True)


def _install() -> None:
    global _PREVIOUS
    _PREVIOUS = signal.signal(signal.SIGTERM, _on_sigterm)


def _uninstall() -> None:
    global _WATCHER
    signal.signal(signal.SIGTERM, signal.SIG_DFL if _PREVIOUS is None else _PREVIOUS)
    _WATCHER = None


def install_sigterm_handler(watcher: PreemptionWatcher) -> None:
    """Make SIGTERM notify `watcher` in this Ray worker process (instead of exiting at once), until
    `watcher.close()`: after the loop, a SIGTERM is Ray stopping the finished worker, not a notice.

    Ray Train runs the training function in a thread, and Python only lets the main thread set
    signal handlers; a task sent to the worker's own actor runs on its (idle) main thread.
    `execute` is Ray Train 2.60's worker-side call for running a function on the worker actor.
    """
    import ray

    global _WATCHER
    _WATCHER = watcher
    actor = ray.get_runtime_context().current_actor
    ray.get(actor.execute.remote(_install), timeout=30)
    watcher.on_close(lambda: ray.get(actor.execute.remote(_uninstall), timeout=30))
