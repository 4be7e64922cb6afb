"""bench.train_speed: its gradient check (a row whose compiled step loses gradients is reported as an error)
and its rows' configurations."""
from __future__ import annotations

import argparse
import contextlib
import fcntl

import pytest
import torch
import torch.nn as nn

from app.config import from_dict
from app.model.gpt import GPT, ModelConfig
from app.train.config import TrainConfig
from bench.train_speed import GRAD_CHECK_MIN_COS, VARIANTS, Turns, _batches, _checked, _time_steps, grad_check


class _ZeroGradients(nn.Module):
    """The model's loss with its gradient multiplied by zero, as the broken compiled FP8 backward had it."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, targets, lmatch=None):
        _, loss = self.model(idx, targets)
        return None, loss.detach() + 0.0 * loss


def _tiny():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    return model, _batches(64, micro=2, seq_len=16, accum=1, seed=0)[0]


def test_grad_check_passes_the_same_gradients_and_flags_lost_ones():
    model, batch = _tiny()
    cpu, autocast = torch.device("cpu"), contextlib.nullcontext
    same = grad_check(model, model, batch, cpu, autocast)
    assert same["min_cos"] > 0.9999
    assert "error" not in _checked({"tokens_per_s": 1}, same)
    lost = grad_check(_ZeroGradients(model), model, batch, cpu, autocast)
    assert lost["min_cos"] < GRAD_CHECK_MIN_COS and lost["param"]
    row = _checked({"tokens_per_s": 1}, lost)
    assert lost["param"] in row["error"] and row["grad_check"] is lost
    assert all(p.grad is None for p in model.parameters())  # it leaves no gradients behind
    assert lost["param"] in _checked({"tokens_per_s": 1}, lost, fp8_blocks=True)["error"]  # FP8's floor too


def test_fp8_rows_have_a_lower_floor_than_bf16_rows():
    """FP8 blocks' compiled and eager gradients read 0.96-0.98 apart on an H100: passed for FP8 rows only."""
    check = {"min_cos": 0.97, "param": "model.layers.10.self_attn.q_proj.weight"}
    assert "error" not in _checked({"tokens_per_s": 1}, dict(check), fp8_blocks=True)
    assert "0.97" in _checked({"tokens_per_s": 1}, dict(check))["error"]


def _other_child_could(path: str, op: int) -> bool:
    """Whether another child (another open file description) could take the lock with `op` right now."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def test_timed_steps_hold_the_turn_alone_and_compiling_steps_share_it(tmp_path):
    lock = str(tmp_path / "turns.lock")
    args = argparse.Namespace(warmup=2, steps=3, profile_dir="", turns=Turns(lock))
    args.turns.take(fcntl.LOCK_SH)  # as a child does from its start
    seen = []

    def step():
        seen.append((_other_child_could(lock, fcntl.LOCK_SH), _other_child_could(lock, fcntl.LOCK_EX)))
        return torch.tensor(1.0)

    warm, dt, losses = _time_steps(step, torch.device("cpu"), args)
    assert seen[0] == (True, False)  # the compiling step: others may compile beside it, none may time
    assert seen[1:] == [(False, False)] * (args.warmup - 1 + args.steps)  # warmup and timed steps: alone
    assert _other_child_could(lock, fcntl.LOCK_EX)  # released for the next child
    assert losses == [1.0] * args.steps and warm >= 0 and dt >= 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_is_a_valid_training_config(name):
    """Each row's overrides pass the trainer's and the model's validation (as `run_spotlm` builds them), so a
    misspelt option fails here rather than in a GPU run."""
    variant = VARIANTS[name]
    cfg = from_dict(TrainConfig, {"preset": "gpt2-124m", **variant, "perf": {"cuda_graph": "false", **variant["perf"]}})
    ModelConfig.preset("gpt2-124m", **cfg.model)
    assert cfg.perf.fp8 == "all" and "window" in cfg.perf.kernel_set()
