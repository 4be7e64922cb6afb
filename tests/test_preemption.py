"""Preemption notices Ray does not see: the AWS spot interruption notice (against a fake metadata server on
loopback) and SIGTERM while the loop runs raise the same flag; Ray's own (node drains, lost nodes) are given to
Ray's budget."""
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.train.preemption import PreemptionWatcher, aws_spot_notice, install_sigterm_handler


@pytest.fixture
def metadata_server():
    """A stand-in for EC2's instance metadata service: IMDSv2 token, then 404 until `notice` is set."""
    state = {"notice": False, "tokens": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_PUT(self):
            state["tokens"] += 1
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"tok")

        def do_GET(self):
            ok = self.path == "/latest/meta-data/spot/instance-action" and state["notice"] \
                and self.headers.get("X-aws-ec2-metadata-token") == "tok"
            self.send_response(200 if ok else 404)
            self.end_headers()
            if ok:
                self.wfile.write(b'{"action": "terminate", "time": "2026-11-22T10:00:00Z"}')

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()


def test_aws_notice_is_seen_only_once_scheduled(metadata_server):
    url, state = metadata_server
    assert not aws_spot_notice(url)
    state["notice"] = True
    assert aws_spot_notice(url) and state["tokens"] == 2


def test_watcher_polls_aws_and_flags(metadata_server):
    url, state = metadata_server
    w = PreemptionWatcher(poll_s=0.05, aws_endpoint=url)
    time.sleep(0.3)
    assert not w.should_stop()
    state["notice"] = True
    deadline = time.time() + 5
    while not w.should_stop() and time.time() < deadline:
        time.sleep(0.05)
    assert w.should_stop() and "aws" in w.reason
    w.close()


def test_unreachable_metadata_is_no_notice():
    assert not aws_spot_notice("http://127.0.0.1:9", timeout=0.2)


def test_notify_keeps_the_first_reason():
    w = PreemptionWatcher(aws_auto=False)
    assert not w.should_stop()
    w.notify("signal SIGTERM")
    w.notify("aws spot interruption notice")
    assert w.should_stop() and w.reason == "signal SIGTERM"


def test_preemptions_are_rays_budget(tmp_path):
    """cluster.max_preemptions is Ray's preemption budget (apart from max_failures); a drained node's
    survivors may finish the just-in-time checkpoint's collectives without it, `preemption_grace_s` past it."""
    from app.train.run import _trainer
    from tests.conftest import train_config

    cfg = train_config(storage=str(tmp_path), cluster={"max_failures": 2, "max_preemptions": 7,
                                                       "preemption_grace_s": 12.5})
    fc = _trainer(cfg, use_gpu=False).run_config.failure_config
    assert (fc.max_failures, fc.max_preemption_failures) == (2, 7)
    assert fc.relax_collectives_on_preemption and fc.preemption_grace_s == 12.5


def test_sigterm_is_a_notice_only_until_the_watcher_closes(ray_session):
    """In a worker shaped like Ray Train's (the loop in a thread, `execute` on the idle main thread),
    SIGTERM is a notice while the loop runs; after `close()` it stops the process, as Ray means when
    it tears a finished worker down."""
    import ray

    @ray.remote(num_cpus=0)
    class Worker:
        def __init__(self):
            self.watcher = PreemptionWatcher(aws_auto=False)
            self.done = threading.Event()

        def execute(self, fn):
            return fn()

        def in_thread(self, what: str) -> int:
            self.done.clear()
            step = (lambda: install_sigterm_handler(self.watcher)) if what == "install" else self.watcher.close
            threading.Thread(target=lambda: (step(), self.done.set())).start()
            return os.getpid()

        def status(self) -> tuple[bool, bool, str]:
            return self.done.is_set(), self.watcher.should_stop(), self.watcher.reason

    def wait_done(w):
        deadline = time.time() + 30
        while not ray.get(w.status.remote())[0]:
            assert time.time() < deadline
            time.sleep(0.05)

    w = Worker.remote()
    pid = ray.get(w.in_thread.remote("install"))
    wait_done(w)
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 10
    while not ray.get(w.status.remote())[1]:
        assert time.time() < deadline
        time.sleep(0.05)
    assert ray.get(w.status.remote())[2] == "signal SIGTERM"  # a notice: the process lives on
    ray.get(w.in_thread.remote("close"))
    wait_done(w)
    os.kill(pid, signal.SIGTERM)
    with pytest.raises(ray.exceptions.RayActorError):  # no longer caught: the worker stops
        for _ in range(100):
            ray.get(w.status.remote(), timeout=10)
            time.sleep(0.1)
