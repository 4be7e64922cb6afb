"""Jobs on a real two-node Ray cluster on loopback (`ray start --head` + `ray start --address`):
`ray job submit` for tokenize and train, workers SIGKILLed at random steps with a bitwise-equal
result, and an elastic run that loses a node and carries on with one worker."""
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(pids_with):
    """A head (2 CPUs) and a worker node (2 CPUs, resource `spare_node`), both on 127.0.0.1,
    in their own temp dir so that tearing down touches nothing else."""
    # Short: Ray's AF_UNIX socket paths under the temp dir must stay within 107 bytes.
    temp = tempfile.mkdtemp(prefix="spotlm-rc-", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # Token auth, with this cluster's own token: `ray start` does not create one, and on a fresh machine
    # ~/.ray/auth_token may not exist yet (some ray.init() writes it), which failed the head's start in CI.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]

    def ray_start(*args: str) -> None:
        # Every node's dashboard agent gets its own HTTP port: with Ray's fixed default (52365) two nodes
        # on one host race for it, and if the worker's agent wins, the head has no agent to take jobs.
        r = subprocess.run([BIN / "ray", "start", *args, f"--dashboard-agent-listen-port={_free_port()}", *common],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"ray start {' '.join(args)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"

    ray_start("--head", f"--port={port}", f"--dashboard-port={dash}", "--include-dashboard=true",
              "--dashboard-host=127.0.0.1", f"--temp-dir={temp}")
    c = {"env": env, "address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{port}", "temp": str(temp)}
    c["add_node"] = lambda: ray_start(f"--address={c['gcs']}", '--resources={"spare_node": 1}')
    c["add_node"]()
    yield c
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_with(str(temp)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    shutil.rmtree(temp, ignore_errors=True)


def submit(cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python -m jobs...`; waits for the job's end."""
    cmd = [BIN / "ray", "job", "submit", f"--address={cluster['address']}", f"--working-dir={ROOT}", "--",
           "python", *args]
    deadline = time.time() + 90
    while True:
        r = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in r.stderr or time.time() > deadline:  # the head's agent is still starting
            return r
        time.sleep(3)


@pytest.fixture(scope="module")
def shards(cluster, shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("jobdata")
    (d / "in.txt").write_text((shared_data / "tinyshakespeare.txt").read_text()[:200_000])
    r = submit(cluster, "-m", "jobs.tokenize", f"--inputs={d / 'in.txt'}", f"--output={d / 'shards'}",
               "--vocab_size=512", "--text_unit=paragraph", "--val_fraction=0.1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tokenized in" in r.stdout  # the job's summary line
    return str(d / "shards")


def train_args(shards, storage, name, *extra):
    return ["-m", "jobs.train", f"--data={shards}", f"--storage={storage}", f"--name={name}", "--preset=tiny",
            "--seq_len=64", "--micro_batch=2", "--batch_tokens=512", "--optim.lr=3e-3",
            "--schedule.warmup_steps=3", "--eval_every=0", "--log_every=1", "--cluster.cpus_per_worker=1",
            "--perf.deterministic", "--export=none", *extra]


def last_checkpoint(run_dir: Path) -> tuple[dict, dict]:
    done = sorted(p.parent for p in run_dir.glob("checkpoint_*/DONE"))
    return torch.load(done[-1] / "model.pt"), json.loads((done[-1] / "state.json").read_text())


def test_failed_job_exits_nonzero(cluster, tmp_path):
    r = submit(cluster, "-m", "jobs.train", f"--data={tmp_path / 'none'}", f"--storage={tmp_path}", timeout=300)
    assert r.returncode != 0 and "no manifest" in r.stdout + r.stderr


def test_train_job_survives_repeated_sigkill_bitwise(cluster, shards, tmp_path, pids_with):
    steps = "--max_steps=50"
    r = submit(cluster, *train_args(shards, tmp_path, "ref", steps, "--ckpt.every=50"))
    assert r.returncode == 0, r.stdout[-3000:]
    killed = []
    # Three random steps, each after the run's second checkpoint (so a registered one exists).
    targets = sorted(random.Random(1).sample(range(12, 46), 3))
    progress = tmp_path / "killed" / "progress.json"

    def killer():
        deadline, last_kill = time.time() + 400, 0.0
        while len(killed) < 3 and time.time() < deadline:
            try:
                p = json.loads(progress.read_text())
            except (OSError, ValueError):
                p = {}
            # Only progress written after the last kill counts (a restart rewinds the step).
            if p.get("time", 0) > last_kill and p["step"] >= targets[len(killed)] and (pids := pids_with("RayTrainWorker")):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.append(p["step"])
                last_kill = time.time()
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    r = submit(cluster, *train_args(shards, tmp_path, "killed", steps, "--ckpt.every=5", "--cluster.max_failures=10"))
    t.join()
    assert r.returncode == 0, r.stdout[-3000:]
    assert len(killed) == 3
    (w_ref, s_ref), (w_killed, s_killed) = last_checkpoint(tmp_path / "ref"), last_checkpoint(tmp_path / "killed")
    assert s_killed["step"] == s_ref["step"] == 50 and s_killed["resumes"] >= 1
    assert all(torch.equal(w_ref[k], w_killed[k]) for k in w_ref)
    assert s_killed["loss_curve"] == s_ref["loss_curve"]


def test_elastic_run_loses_a_node_and_matches_one_worker(cluster, shards, tmp_path, pids_with):
    steps = "--max_steps=40"
    r = submit(cluster, *train_args(shards, tmp_path, "one", steps, "--ckpt.every=40"))
    assert r.returncode == 0, r.stdout[-3000:]
    lost = []

    def lose_spare_node():
        deadline = time.time() + 300
        while not lost and time.time() < deadline:
            if list((tmp_path / "elastic").glob("checkpoint_*/DONE")):
                for pid in pids_with("spare_node", "raylet"):  # the worker node's raylet: the node is gone
                    os.kill(pid, signal.SIGKILL)
                    lost.append(pid)
            time.sleep(0.1)

    t = threading.Thread(target=lose_spare_node, daemon=True)
    t.start()
    r = submit(cluster, *train_args(shards, tmp_path, "elastic", steps, "--ckpt.every=5", "--cluster.num_workers=2",
                                    "--cluster.min_workers=1", "--cluster.cpus_per_worker=2",
                                    "--cluster.max_failures=5", "--cluster.resize_check_s=5"))
    t.join()
    cluster["add_node"]()  # leave the cluster whole for other tests
    assert lost and r.returncode == 0, r.stdout[-3000:]
    _, s_one = last_checkpoint(tmp_path / "one")
    _, s_el = last_checkpoint(tmp_path / "elastic")
    assert s_el["step"] == 40 and s_el["tokens"] == s_one["tokens"]  # same tokens per step throughout
    assert s_el["resumes"] >= 1
    curve_one, curve_el = s_one["loss_curve"], s_el["loss_curve"]
    assert curve_one.keys() == curve_el.keys()
    for step in curve_one:
        assert curve_el[step] == pytest.approx(curve_one[step], rel=1e-4, abs=1e-5), step
