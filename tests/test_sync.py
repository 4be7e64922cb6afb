"""How workers combine their work (app/train/sync.py): the onebit DDP hook and DiLoCo's outer step on a
2-process gloo group, then each sync mode through Ray Train with 2 workers."""
import json
import os
import signal
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.train.config import SyncConfig
from app.train.run import list_checkpoints, train
from app.train.sync import (SIGN_BLOCK, BucketLayout, CommCounter, DiLoCo, Int8Codec, OneBitState, SignCodec,
                             allreduce_bytes, counting_allreduce_hook, onebit_hook, pack_signs, refreshes,
                             two_phase_mean, unpack_signs)
from tests.conftest import train_config

WORLD = 2


def _spawn(fn, *args) -> list:
    """Run fn(rank, *args) in WORLD processes joined in a gloo group; returns each rank's result."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(fn, d, args), nprocs=WORLD)
        return [torch.load(os.path.join(d, f"out_{r}.pt"), weights_only=False) for r in range(WORLD)]


def _entry(rank: int, fn, d: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=rank, world_size=WORLD)
    try:
        torch.save(fn(rank, *args), os.path.join(d, f"out_{rank}.pt"))
    finally:
        dist.destroy_process_group()


class FakeBucket:
    """The three things a DDP comm hook reads of its GradBucket."""

    def __init__(self, grads: list[torch.Tensor], index: int = 0):
        self._buf = torch.cat([g.view(-1) for g in grads])
        self._grads = [self._buf[o:o + g.numel()].view(g.shape) for o, g in
                       zip(torch.tensor([0, *[g.numel() for g in grads]]).cumsum(0).tolist(), grads)]
        self._index = index

    def buffer(self):
        return self._buf

    def gradients(self):
        return self._grads

    def index(self):
        return self._index


SHAPES = [(37,), (10, 10), (5,)]


def _grads(rank: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(s, generator=g) * scale * (i + 1) for i, s in enumerate(SHAPES)]


def _mean_rounds(rank: int, rounds: int, codec: str) -> dict:
    bucket = FakeBucket(_grads(rank))
    lay = BucketLayout.of([g.numel() for g in bucket.gradients()], WORLD)
    coder = SignCodec(lay) if codec == "sign" else Int8Codec(lay)
    res = (torch.zeros(lay.padded), torch.zeros(lay.chunk)) if codec == "sign" else None
    counter, outs, sent = CommCounter(), [], []
    for _ in range(rounds):
        x = torch.zeros(lay.padded)
        x[:lay.numel] = bucket.buffer()
        before = counter.sent
        outs.append(two_phase_mean(x, lay, coder, counter, res)[:lay.numel].clone())
        sent.append(counter.sent - before)
    return {"outs": torch.stack(outs), "sent": sent, "chunk": lay.chunk, "n_local": [len(p) for p in lay.pieces]}


def _truth() -> torch.Tensor:
    return (torch.cat([g.view(-1) for g in _grads(0)]) + torch.cat([g.view(-1) for g in _grads(1)])) / 2


def test_sign_mean_is_close_error_feedback_converges_and_bytes_are_the_packed_sizes():
    res = _spawn(_mean_rounds, 40, "sign")
    truth = _truth()
    a, b = res[0]["outs"], res[1]["outs"]
    assert torch.equal(a, b)  # every rank gets the same average
    first, after10, after40 = ((a[:t].mean(0) - truth).norm() / truth.norm() for t in (1, 10, 40))
    assert first < 1.0  # one round: 1 bit per element, coarse but bounded
    # error feedback: what one round leaves out comes in later ones, so the running mean closes in on the truth
    assert after40 < 0.2 and after40 < first / 4 and after40 < 0.6 * after10
    # Each tensor keeps its scale: 1-bit with mean |x| per tensor gets each tensor's magnitude right on average.
    offsets = [0, 37, 137, 142]
    for i in range(3):
        seg_out, seg_true = a.mean(0)[offsets[i]:offsets[i + 1]], truth[offsets[i]:offsets[i + 1]]
        assert seg_out.abs().mean() == pytest.approx(seg_true.abs().mean(), rel=0.25)

    # 142 elements padded to 512 = 2 chunks of 256: [37 | 100 | 5 | pad 114] and [pad]
    assert res[0]["chunk"] == 256 and res[0]["n_local"] == [4, 1]
    cb = 256 // 8
    for rank in range(WORLD):
        phase1 = cb + 4 * res[0]["n_local"][1 - rank]  # chunk `other`'s bits and its tensors' scales
        phase2 = (WORLD - 1) * (cb + 4 * 4)  # all-gather of the re-encoded chunks, padded to the longest
        assert res[rank]["sent"] == [phase1 + phase2] * 40


def test_int8_mean_is_within_int8_rounding_of_the_mean():
    res = _spawn(_mean_rounds, 1, "int8")
    truth = _truth()
    out = res[0]["outs"][0]
    assert torch.equal(out, res[1]["outs"][0])
    # rounding twice (each rank's block, then the mean's block) to 1/127 of the block's max |x|
    assert (out - truth).abs().max() <= 2 * truth.abs().max() / 127
    assert res[0]["sent"][0] == (256 + 4) + (256 + 4)  # one chunk and its block scale each way


def _adam_reference(steps: int, beta1: float = 0.9, every: int = 64) -> list[torch.Tensor]:
    """1-bit Adam's updates had the momentum been averaged exactly (the second moment refreshed alike)."""
    m = v = torch.zeros(142)
    out, k = [], 0
    for t in range(steps):
        g = (_step_grads(0, t) + _step_grads(1, t)) / 2
        if refreshes(t, every):
            k += 1
            v = 0.5 * v + 0.5 * g * g
        m = beta1 * m + (1 - beta1) * g
        out.append((m / (1 - beta1 ** (t + 1))) / ((v / (1 - 0.5 ** k)).sqrt() + 1e-8))
    return out


def _step_grads(rank: int, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * t + rank)
    base = torch.cat([x.view(-1) for x in _grads(0)])  # a shared direction plus each rank's noise
    return base + 0.5 * torch.randn(142, generator=g)


def _hook_steps(rank: int, steps: int, split: int) -> dict:
    """`steps` hook calls; at `split` the state is saved and loaded into a fresh state (a resume)."""
    state, outs, sent = OneBitState(CommCounter()), [], []
    for t in range(steps):
        if t == split:
            shared, own = state.shared_state(), state.rank_state()
            state = OneBitState(CommCounter())
            state.load(shared, own)
        before = state.counter.sent
        bucket = FakeBucket([x.view(s) for x, s in zip(_step_grads(rank, t).split([37, 100, 5]), SHAPES)])
        outs.append(onebit_hook(state, bucket).value().clone())
        sent.append(state.counter.sent - before)
    return {"outs": torch.stack(outs), "sent": sent}


def test_onebit_hook_follows_adam_on_the_mean_and_resumes_exactly():
    steps = 40
    res = _spawn(_hook_steps, steps, steps)
    resumed = _spawn(_hook_steps, steps, 13)
    a = res[0]["outs"]
    assert torch.equal(a, res[1]["outs"])  # every rank applies the same update
    assert torch.equal(a, resumed[0]["outs"]) and torch.equal(a, resumed[1]["outs"])  # state round-trips
    ref = torch.stack(_adam_reference(steps))
    # a refresh step averages in int8: Adam's first update, sign(mean), but where int8 rounds a mean to zero
    assert ((a[0] - ref[0]).abs() < 0.05).float().mean() > 0.98
    # in between, the momentum goes in 1 bit: each step is coarse, and with error feedback the sum of the
    # updates (the weights' path) stays close to exact averaging's (without it: 0.29 here)
    drift = (a.cumsum(0) - ref.cumsum(0)).norm(dim=1) / ref.cumsum(0).norm(dim=1)
    assert drift[-1] < 0.2, drift
    sent = res[0]["sent"]
    refresh = [t for t in range(steps) if refreshes(t, 64)]
    assert refresh == [0, 1, 2, 4, 8, 16, 32]
    assert len({sent[t] for t in refresh}) == 1 and len({s for t, s in enumerate(sent) if t not in refresh}) == 1
    norms = allreduce_bytes(4 * len(SHAPES), WORLD)  # every step: the tensors' squared gradient norms
    for rank, r in enumerate(res):
        # a refresh: int8, one chunk and its block scale each way
        assert r["sent"][0] == 2 * (256 + 4) + norms
        # 1 bit: the other chunk's bits and scales (chunk 0 holds 4 pieces, chunk 1 one), then the all-gather
        assert r["sent"][3] == (32 + 4 * [4, 1][1 - rank]) + (32 + 4 * 4) + norms


def _stale_moment_steps(rank: int) -> torch.Tensor:
    """Steps 0-2 refresh the second moment; at step 3 (1 bit) one element's gradient is 1,000x what it was."""
    state, outs = OneBitState(CommCounter()), []
    for t in range(4):
        grads = _grads(rank)
        if t == 3:
            grads[1][0, 0] = 1000 * grads[1][0, 0].abs()
        outs.append(onebit_hook(state, FakeBucket(grads)).value().clone())
    return torch.stack(outs)


def test_onebit_step_stays_within_adams_bound_when_the_second_moment_is_stale():
    # The second moment is stale between refreshes: unbounded, the grown element's step (and, through the
    # shared 1-bit scale, its neighbours') would be many times Adam's largest, and error feedback would carry
    # the excess on into later steps.
    outs = _spawn(_stale_moment_steps)
    assert torch.equal(outs[0], outs[1])
    step = outs[0][3]
    assert step.abs().max() <= 1 + 1e-5, step.abs().max()
    grown = SHAPES[0][0]  # the flat index of the second tensor's first element
    assert step[grown] > 0  # it still moves its gradient's way (the hook returns what SGD subtracts)


def _big_bucket(rank: int) -> list[float]:
    state = OneBitState(CommCounter())
    g = torch.Generator().manual_seed(rank)
    bucket = FakeBucket([torch.randn(256, 256, generator=g), torch.randn(1000, generator=g)])
    sent = []
    for _ in range(4):  # steps 0, 1, 2 refresh; step 3 is 1-bit
        before = state.counter.sent
        onebit_hook(state, bucket)
        sent.append(state.counter.sent - before)
    return sent


def test_onebit_sends_over_25x_fewer_bytes_than_fp32_allreduce_between_refreshes():
    fp32 = allreduce_bytes((256 * 256 + 1000) * 4, WORLD)
    for sent in _spawn(_big_bucket):
        assert fp32 / sent[3] >= 25 and 3.9 <= fp32 / sent[0] <= 4, [fp32 / s for s in sent]


def test_sign_bits_are_numpys_packbits_and_unpack_to_plus_minus_one():
    x = torch.randn(8 * 1000, generator=torch.Generator().manual_seed(0))
    x[::5], x[1::7] = 0.0, -0.0  # zeros count as >= 0
    x[:8] = torch.tensor([1.0, 1, -1, -1, -1, -1, -1, 1])  # the first element is the first byte's high bit
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed[0] == 0b11000001
    assert np.array_equal(packed.numpy(), np.packbits((x >= 0).numpy(), bitorder="big"))
    assert torch.equal(unpack_signs(packed), torch.where(x >= 0, 1.0, -1.0))


def test_layout_cuts_each_tensor_into_runs_of_one_sign_scale():
    sizes = [5000, 300, 7000]
    lay = BucketLayout.of(sizes, 2)
    assert lay.numel == 12300 and lay.padded == 12800 and lay.chunk == 6400
    # chunk 0: the first tensor in runs of at most SIGN_BLOCK, the second, the third's start; chunk 1: its rest, pad
    assert lay.pieces == [[SIGN_BLOCK, SIGN_BLOCK, 5000 - 2 * SIGN_BLOCK, 300, 1100],
                          [SIGN_BLOCK, SIGN_BLOCK, 5900 - 2 * SIGN_BLOCK, 500]]
    # a run keeps its own scale: decoded, each run's mean |x| is the encoded input's
    x = torch.cat([torch.full((SIGN_BLOCK,), 4.0), -torch.full((SIGN_BLOCK,), 0.5), torch.randn(2304)])
    codec = SignCodec(lay)
    out = codec.decode(codec.encode(x, 0), 0)
    assert torch.equal(out[:SIGN_BLOCK], torch.full((SIGN_BLOCK,), 4.0))
    assert torch.equal(out[SIGN_BLOCK:2 * SIGN_BLOCK], torch.full((SIGN_BLOCK,), -0.5))
    assert len(codec.encode(x, 0)) == codec.size(0) == 6400 // 8 + 4 * 5


def test_refresh_schedule():
    assert [t for t in range(70) if refreshes(t, 24)] == [0, 1, 2, 4, 8, 16, 24, 32, 48, 64]


def _ddp_grads(rank: int, hook: bool) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    counter = CommCounter()
    if hook:
        ddp.register_comm_hook(counter, counting_allreduce_hook)
    for step in range(3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(10 * rank + step))
        ddp.zero_grad()
        ddp(x).pow(2).mean().backward()
    return {"grads": [p.grad.clone() for p in model.parameters()], "sent": counter.sent,
            "numel": sum(p.numel() for p in model.parameters())}


def test_counting_hook_is_ddps_default_bitwise():
    plain, counted = _spawn(_ddp_grads, False), _spawn(_ddp_grads, True)
    for r in range(WORLD):
        assert all(torch.equal(a, b) for a, b in zip(plain[r]["grads"], counted[r]["grads"]))
        assert counted[r]["sent"] == 3 * allreduce_bytes(counted[r]["numel"] * 4, WORLD)


# ---------------------------------------------------------------- DiLoCo's outer step

G0 = [torch.linspace(-1, 1, 12).view(3, 4), torch.linspace(0, 2, 5)]


def _local_delta(rank: int, round_: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * round_ + rank)
    return [torch.randn(t.shape, generator=g) * 0.1 for t in G0]


def _outer_rounds(rank: int, cfg: SyncConfig, steps: list[list[int]]) -> dict:
    params = [torch.nn.Parameter(t.clone()) for t in G0]
    diloco = DiLoCo(params, cfg, CommCounter())
    out = []
    for i, per_rank in enumerate(steps):
        with torch.no_grad():
            for p, g, d in zip(params, diloco.global_params, _local_delta(rank, i)):
                p.copy_(g - d)  # as if the inner steps moved the weights by -d
        result = diloco.outer_step(per_rank[rank])
        out.append({"params": [p.detach().clone() for p in params], "steps": result.inner_steps,
                    "sent": result.sent})
    return {"rounds": out, "residuals": [r.clone() for r in diloco.residuals]}


def _reference(steps: list[list[int]], cfg: SyncConfig) -> list[list[torch.Tensor]]:
    """torch's own Nesterov SGD on the weighted mean delta as the gradient."""
    params = [torch.nn.Parameter(t.clone()) for t in G0]
    opt = torch.optim.SGD(params, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=True)
    out = []
    for i, per_rank in enumerate(steps):
        w = [s / sum(per_rank) for s in per_rank]
        for j, p in enumerate(params):
            p.grad = sum(w[r] * _local_delta(r, i)[j] for r in range(WORLD))
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("steps", [[[5, 5], [5, 5], [5, 5]], [[1, 3], [4, 2], [2, 2]]],
                         ids=["equal", "weighted"])
def test_diloco_outer_step_is_nesterov_on_the_weighted_mean_delta(steps):
    cfg = SyncConfig(mode="diloco")
    res = _spawn(_outer_rounds, cfg, steps)
    ref = _reference(steps, cfg)
    n = sum(t.numel() for t in G0) + 0
    for r in range(WORLD):
        for i, rnd in enumerate(res[r]["rounds"]):
            assert rnd["steps"] == steps[i]
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(rnd["params"], ref[i]))
            assert rnd["sent"] == allreduce_bytes(n * 4, WORLD)
    if steps[0] == [5, 5]:  # equal weights: the first round's mean is the plain average
        plain = [(a + b) / 2 for a, b in zip(_local_delta(0, 0), _local_delta(1, 0))]
        first = [g - cfg.outer_lr * (1 + cfg.outer_momentum) * d for g, d in zip(G0, plain)]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(res[0]["rounds"][0]["params"], first))


@pytest.mark.parametrize("how", ["int8", "onebit"])
def test_diloco_compressed_deltas_with_error_feedback(how):
    cfg = SyncConfig(mode="diloco", compress=how, outer_momentum=0.0, outer_lr=1.0)
    rounds = 1 if how == "int8" else 40
    res = _spawn(_same_delta_rounds, cfg, rounds)
    exact = [(a + b) / 2 for a, b in zip(_local_delta(0, 0), _local_delta(1, 0))]
    moved = [(g - p) / rounds for g, p in zip(G0, res[0]["params"])]  # mean applied delta per round
    err = sum((m - e).norm() ** 2 for m, e in zip(moved, exact)) ** 0.5 / sum(e.norm() ** 2 for e in exact) ** 0.5
    assert err < (0.02 if how == "int8" else 0.1), err
    assert torch.equal(res[0]["params"][0], res[1]["params"][0])
    # the two-phase mean: 17 elements padded to 2 chunks of 256, one sent each way (1 tensor and the padding in
    # chunk 0; one block scale per chunk for int8, a scale per tensor in the chunk for 1 bit)
    per_round = 2 * (256 + 4) if how == "int8" else (256 // 8 + 4 * 1) + (256 // 8 + 4 * 3)
    assert res[0]["sent"] == per_round * rounds
    assert res[0]["residual"] > 0  # what compression left out is carried to the next round


def _same_delta_rounds(rank: int, cfg: SyncConfig, rounds: int) -> dict:
    params = [torch.nn.Parameter(t.clone()) for t in G0]
    diloco = DiLoCo(params, cfg, CommCounter())
    for _ in range(rounds):
        with torch.no_grad():
            for p, g, d in zip(params, diloco.global_params, _local_delta(rank, 0)):
                p.copy_(g - d)
        diloco.outer_step(1)
    return {"params": [p.detach().clone() for p in params], "sent": diloco.counter.sent,
            "residual": float(sum(r.norm() for r in diloco.residuals.values()))}


def _warm_start(rank: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    diloco = DiLoCo(list(model.parameters()), SyncConfig(mode="diloco", warmup_steps=steps), CommCounter())
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.1},
                             {"params": [model.bias], "weight_decay": 0.0}], lr=0.05)
    losses = []
    for t in range(steps):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(10 * t + rank))
        model.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        diloco.warmup_step(opt)
    moments = diloco.warm.moments[0]
    diloco.end_warmup(opt)
    state = opt.state[model.weight]
    weight, exp_avg, step = model.weight.detach().clone(), state["exp_avg"].clone(), float(state["step"])
    opt.step()  # AdamW goes on from the handed-over state (each rank on its own gradient)
    return {"losses": losses, "weight": weight, "exp_avg": exp_avg,
            "moment": moments.exp_avg[:32].view(4, 8).clone(), "step": step,
            "global": diloco.global_params[0].clone(), "warm": diloco.warm}


def test_diloco_warm_start_is_synchronous_one_bit_adam_then_hands_adamw_its_moments():
    a, b = _spawn(_warm_start, 12)
    assert torch.equal(a["weight"], b["weight"])  # synchronous: the same weights on every rank
    assert torch.equal(a["global"], b["global"])  # the rounds start from the warm weights
    assert sum(a["losses"][-3:]) < 0.5 * sum(a["losses"][:3])  # it learns
    assert torch.equal(a["exp_avg"], a["moment"]) and a["step"] == 12 and a["warm"] is None


# ---------------------------------------------------------------- through Ray Train, 2 workers

def sync_cfg(data, tmp_path, name, **kw):
    base = dict(data=data, storage=str(tmp_path / "runs"), name=name, preset="tiny", seq_len=64, micro_batch=4,
                batch_tokens=512, eval_every=0, eval_tokens=2048, log_every=5, export="none", optim={"lr": 3e-3},
                schedule={"warmup_steps": 3}, model={"n_layer": 1}, perf={"deterministic": True},
                cluster={"num_workers": 2, "cpus_per_worker": 0.5})
    return train_config(base, **kw)


def _progress(cfg) -> dict:
    return json.load(open(os.path.join(cfg.run_dir, "progress.json")))


def _curve(cfg) -> dict[int, float]:
    last = list_checkpoints(cfg.run_dir)[-1]
    return {int(k): v for k, v in json.load(open(os.path.join(last, "state.json")))["loss_curve"].items()}


@pytest.mark.slow  # two runs of 2 Ray Train workers
def test_ddp_and_onebit_train_and_onebit_sends_its_share(shakespeare_shards, tmp_path):
    runs = {}
    for mode in ("ddp", "onebit"):
        cfg = sync_cfg(shakespeare_shards, tmp_path, mode, max_steps=30, ckpt={"every": 15}, sync={"mode": mode})
        assert train(cfg).error is None
        runs[mode] = cfg
    for cfg in runs.values():
        curve = _curve(cfg)
        assert curve[30] < curve[5] - 0.5, curve
        p = _progress(cfg)
        assert p["step"] == 30 and p["comm_bytes"] == pytest.approx(30 * p["comm_bytes_per_step"])
    ddp, onebit = _progress(runs["ddp"])["comm_bytes"], _progress(runs["onebit"])["comm_bytes"]
    # 6 of the 30 steps refresh the second moment in int8 (4x fewer bytes than fp32), the other 24 send 1 bit (32x)
    assert ddp / onebit == pytest.approx(30 / (6 / 4 + 24 / 32), rel=0.05), ddp / onebit
    # onebit's residuals are each rank's own: both ranks' files are in the checkpoint
    last = list_checkpoints(runs["onebit"].run_dir)[-1]
    assert all(os.path.exists(os.path.join(last, f"rank_{r}.pt")) for r in range(2))
    # ddp's learning is the fp32 one: onebit ends close to it at equal steps
    assert _curve(runs["onebit"])[30] == pytest.approx(_curve(runs["ddp"])[30], rel=0.1)


@pytest.mark.slow  # three starts of 2 Ray Train workers
def test_diloco_trains_and_resumes_exactly(shakespeare_shards, tmp_path, train_worker_pids):
    # a synchronous warm start to step 15, then rounds of 5 steps; checkpoints every 10, in and after the warm start
    kw = dict(max_steps=40, ckpt={"every": 10}, optim={"name": "adamw"},
              sync={"mode": "diloco", "inner_steps": 5, "compress": "int8", "warmup_steps": 15})
    clean = sync_cfg(shakespeare_shards, tmp_path, "clean", **kw)
    assert train(clean).error is None
    curve = _curve(clean)
    assert curve[40] < curve[min(curve)] - 0.5, curve  # the warm start logs at its end and at the checkpoint
    p = _progress(clean)
    assert p["sync_rounds"] == 5 and p["step"] == 40
    # 1-bit Adam's 15 steps (5 of them int8 refreshes), then int8 deltas once a round: under 3 fp32 all-reduces
    assert 0 < p["comm_bytes"] < allreduce_bytes(4 * 196_800, 2) * 3

    broken = sync_cfg(shakespeare_shards, tmp_path, "broken", **kw)
    sent: list[int] = []

    def term_once():  # SIGTERM one worker once training is under way: it checkpoints at the next round's end
        deadline = time.time() + 120
        while not sent and time.time() < deadline:
            try:
                step = _progress(broken)["step"]
            except (OSError, ValueError):
                step = 0
            if 10 <= step < 30 and (pids := train_worker_pids()):
                os.kill(pids[0], signal.SIGTERM)
                sent.append(pids[0])
            time.sleep(0.02)

    threading.Thread(target=term_once, daemon=True).start()
    assert train(broken).error is None and sent
    a, b = (torch.load(os.path.join(list_checkpoints(c.run_dir)[-1], "model.pt")) for c in (clean, broken))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    state = json.load(open(os.path.join(list_checkpoints(broken.run_dir)[-1], "state.json")))
    assert state["resumes"] == 1 and state["preemptions"] == 1 and state["sync_rounds"] == 5
    assert state["comm_bytes"] == pytest.approx(p["comm_bytes"])  # carried over the resume, nothing twice
    # Each start's first step is timed apart, not the whole first call (10 warm-start steps to the checkpoint,
    # or after the resume a round): every logged speed, the first of each start included, measured steps.
    for cfg in (clean, broken):
        events = EventAccumulator(os.path.join(cfg.run_dir, "tensorboard"))
        events.Reload()
        speeds = [e.value for e in events.Scalars("speed/tokens_per_s")]
        assert len(speeds) >= 7 and min(speeds) > 0, speeds


# ---------------------------------------------------------------- DiLoCo rounds in the loop, one process

class _Steps:
    """Stands in for the loop's step function, loader and schedule: counts, and takes `seconds` a step."""

    def __init__(self, seconds: float):
        self.seconds, self.steps, self.scheduled = seconds, [], 0

    def __call__(self, batches):
        time.sleep(self.seconds)
        return torch.tensor(1.0), torch.tensor(0.0)

    def micro_batches(self, step: int):
        self.steps.append(step)
        return []

    def step(self):  # the scheduler's
        self.scheduled += 1


def _round(seconds: float, start: int, **sync):
    from app.train import checkpoint
    from app.train.loop import _diloco_round
    from app.train.sync import Sync

    cfg = train_config(max_steps=100, ckpt={"every": 10}, eval_every=25, sync={"mode": "diloco", **sync})
    model = torch.nn.Linear(2, 2)
    fake, state = _Steps(seconds), checkpoint.TrainState(step=start)
    _, _, done = _diloco_round(cfg, Sync(cfg.sync, model, 1), fake, fake, fake, None, state, True, 0)
    return fake, done, state


def test_diloco_rounds_end_at_h_steps_and_at_checkpoints_and_evaluations():
    fake, done, state = _round(0.0, 0, inner_steps=4)
    assert done == [4] and fake.steps == [0, 1, 2, 3] and fake.scheduled == 4 and state.sync_rounds == 1
    assert _round(0.0, 8, inner_steps=4)[1] == [2]  # the checkpoint at step 10
    assert _round(0.0, 21, inner_steps=50)[1] == [4]  # the evaluation at step 25
    # the warm start's synchronous steps run to the checkpoint (or to its end) and end no round
    fake, done, state = _round(0.0, 0, inner_steps=4, warmup_steps=15)
    assert done == [10] and fake.steps == list(range(10)) and state.sync_rounds == 0


def test_timed_diloco_rounds_end_at_the_first_step_past_the_deadline():
    fake, done, _ = _round(0.05, 0, round_s=0.18)
    assert 3 <= done[0] <= 5 and fake.steps == list(range(done[0]))  # ~0.18 s of 0.05 s steps, then one more
    assert _round(0.0, 0, round_s=60.0)[1] == [10]  # a long round still ends at the checkpoint


def test_sync_options_that_do_not_mix():
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="sync.compress"):
        train_config(sync={"mode": "ddp", "compress": "int8"})
    with pytest.raises(ConfigError, match="sync.mode=diloco"):
        train_config(sync={"mode": "diloco"}, memory={"fsdp": True})
    with pytest.raises(ConfigError, match="sync.warmup_steps"):
        train_config(sync={"mode": "onebit", "warmup_steps": 10})
    with pytest.raises(ConfigError, match="1-bit Adam"):
        train_config(sync={"mode": "onebit"}, optim={"name": "muon"})
    with pytest.raises(ConfigError, match="warms AdamW"):
        train_config(sync={"mode": "diloco", "warmup_steps": 10}, optim={"name": "muon"})
    with pytest.raises(ConfigError, match="refresh_every"):
        train_config(sync={"mode": "onebit", "refresh_every": 0})
