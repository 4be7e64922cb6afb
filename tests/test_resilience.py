"""Surviving preemption: bitwise-exact resume after kills, SIGTERM checkpoints without using the
failure budget, a kill in the middle of a checkpoint write falls back to the previous one."""
import glob
import json
import os
import random
import signal
import tempfile
import threading
import time

import torch

from app.train import checkpoint
from app.train.config import TrainConfig
from app.train.run import list_checkpoints, train
from tests.conftest import train_config


def cfg_for(data, tmp_path, name, **kw) -> TrainConfig:
    base = dict(data=data, storage=str(tmp_path / "runs"), name=name, preset="tiny", seq_len=64, micro_batch=4,
                batch_tokens=512, eval_every=0, eval_tokens=2048, log_every=1, export="none", optim={"lr": 3e-3},
                schedule={"warmup_steps": 3}, cluster={"cpus_per_worker": 0.5}, perf={"deterministic": True})
    return train_config(base, **kw)


def final_state(cfg: TrainConfig):
    last = list_checkpoints(cfg.run_dir)[-1]
    return torch.load(os.path.join(last, "model.pt")), checkpoint.TrainState(**json.load(
        open(os.path.join(last, "state.json"))))


def latest_step(cfg) -> int:
    done = list_checkpoints(cfg.run_dir)
    return int(os.path.basename(done[-1]).split("_")[1]) if done else 0


def kill_repeatedly(cfg, pids_fn, times: int, rng=random.Random(0)) -> list[int]:
    """In a thread: each time a newer checkpoint appears (well before the end), wait a random
    moment, then SIGKILL the training worker."""
    killed: list[int] = []

    def loop():
        seen, deadline = 0, time.time() + 300
        while len(killed) < times and time.time() < deadline:
            step, pids = latest_step(cfg), pids_fn()
            if seen < step <= cfg.max_steps // 2 and pids:
                time.sleep(rng.uniform(0.0, 0.2))
                try:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                except ProcessLookupError:
                    pass
                seen = step
            time.sleep(0.05)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return killed


def test_interrupted_run_ends_bitwise_equal_to_uninterrupted(shakespeare_shards, tmp_path, train_worker_pids):
    # With a weight average on: it is resumable state too.
    clean = cfg_for(shakespeare_shards, tmp_path, "clean", max_steps=60, ckpt={"every": 4}, optim={"ema_decay": 0.9})
    assert train(clean).error is None
    broken = cfg_for(shakespeare_shards, tmp_path, "broken", max_steps=60, ckpt={"every": 4},
                     cluster={"max_failures": 5}, optim={"ema_decay": 0.9})
    killed = kill_repeatedly(broken, train_worker_pids, times=2)
    result = train(broken)
    assert result.error is None and len(killed) == 2
    (w_clean, s_clean), (w_broken, s_broken) = final_state(clean), final_state(broken)
    # A kill can land after a checkpoint's files appear but before Ray registers it: then the
    # run resumes from the one before, so two kills give one or two resumes.
    assert 1 <= s_broken.resumes <= 2 and s_broken.step == s_clean.step == 60
    assert w_clean.keys() == w_broken.keys()
    assert all(torch.equal(w_clean[k], w_broken[k]) for k in w_clean)  # bitwise
    a_clean, a_broken = (torch.load(os.path.join(list_checkpoints(c.run_dir)[-1], checkpoint.EMA)) for c in (clean, broken))
    assert a_clean["updates"] == a_broken["updates"] == 60
    assert all(torch.equal(a, b) for a, b in zip(a_clean["shadow"], a_broken["shadow"]))
    assert s_broken.loss_curve == s_clean.loss_curve and len(s_clean.loss_curve) == 60


def test_sigterm_checkpoints_at_next_step_without_using_failure_budget(shakespeare_shards, tmp_path, train_worker_pids):
    cfg = cfg_for(shakespeare_shards, tmp_path, "term", max_steps=300, ckpt={"every": 1000},
                  cluster={"max_failures": 0}, log_every=50)
    sent: list[int] = []

    def term_once():
        deadline, progress = time.time() + 120, os.path.join(cfg.run_dir, "progress.json")
        while not sent and time.time() < deadline:
            try:
                step = json.load(open(progress))["step"]
            except (OSError, ValueError):
                step = 0
            if step >= 50 and (pids := train_worker_pids()):  # training (and its SIGTERM handler) is up
                os.kill(pids[0], signal.SIGTERM)
                sent.append(pids[0])
            time.sleep(0.02)

    threading.Thread(target=term_once, daemon=True).start()
    result = train(cfg)  # cluster.max_failures=0: any counted failure would fail the run
    assert sent and result.error is None
    steps = [int(os.path.basename(p).split("_")[1]) for p in list_checkpoints(cfg.run_dir)]
    assert steps[-1] == 300 and len(steps) == 2 and 0 < steps[0] < 300  # the preemption checkpoint
    _, state = final_state(cfg)
    assert state.preemptions == 1 and state.resumes == 1


def test_kill_during_checkpoint_write_resumes_from_previous(shakespeare_shards, tmp_path, train_worker_pids):
    # A wider model so that writing a checkpoint takes long enough to be caught in the act.
    cfg = cfg_for(shakespeare_shards, tmp_path, "midwrite", max_steps=12, ckpt={"every": 3},
                  cluster={"max_failures": 2}, model={"d_model": 512, "n_layer": 4, "n_head": 8}, log_every=3)
    caught: list[str] = []

    def kill_mid_write():
        pattern = os.path.join(tempfile.gettempdir(), "spotlm-ckpt-midwrite-*")
        deadline = time.time() + 240
        while not caught and time.time() < deadline:
            for d in glob.glob(pattern):
                # Two on storage: the first is surely registered with Ray (uploads are asynchronous).
                if len(list_checkpoints(cfg.run_dir)) >= 2 and os.path.exists(os.path.join(d, "model.pt")) \
                        and not os.path.exists(os.path.join(d, checkpoint.DONE)) and (pids := train_worker_pids()):
                    os.kill(pids[0], signal.SIGKILL)
                    caught.append(d)
                    break
            time.sleep(0.005)

    threading.Thread(target=kill_mid_write, daemon=True).start()
    result = train(cfg)
    assert caught, "the checkpoint write was never caught in the act"
    assert result.error is None and result.metrics["step"] == 12 and result.metrics["resumes"] >= 1
    assert all(checkpoint.is_complete(p) for p in list_checkpoints(cfg.run_dir))
