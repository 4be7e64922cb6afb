"""bf16 weights with fp32 master weights (app/train/master.py): AdamW's arithmetic, exact checkpoints, the trainer's choice."""
import copy

import pytest
import torch

from app.config import ConfigError
from app.train.master import MasterAdamW, _chunks
from app.model.gpt import GPT, ModelConfig
from app.train.config import OptimConfig, TrainConfig
from app.train.optim import make_optimizer, uses_bf16_weights

CFG = dict(vocab_size=256, n_layer=2, n_head=4, d_model=64, max_seq_len=32)
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _model(seed=0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(ModelConfig(**CFG))
    m.init_weights()
    return m


def _groups(m):
    return [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)) for _ in range(n)]


def _step(m, opt, x, y) -> float:
    loss = m(x, y)[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_fp32_master_adamw_is_adamw_bitwise():
    """With fp32 weights the masters are the weights: every step equals torch's fused AdamW bit for bit."""
    a, b = _model(), _model()
    opt_a = torch.optim.AdamW(_groups(a), **HYPER, fused=True)
    opt_b = MasterAdamW(_groups(b), **HYPER, dtype=torch.float32)
    for x, y in _batches(3):
        assert _step(a, opt_a, x, y) == _step(b, opt_b, x, y)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_bf16_weights_follow_the_fp32_masters():
    m = _model()
    ref = _model()
    opt = MasterAdamW(_groups(m), **HYPER)
    ref_opt = torch.optim.AdamW(_groups(ref), **HYPER, fused=True)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    for x, y in _batches(3):
        loss = m(x, y)[1]
        loss.backward()
        for p, q in zip(m.parameters(), ref.parameters()):  # the reference steps on the same (bf16) gradients
            q.grad = p.grad.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32 and torch.equal(master, q), n
        assert torch.equal(p, master.to(torch.bfloat16)), n


def test_updates_below_bf16_resolution_are_kept():
    """A bf16 weight of 1.0 cannot move by 1e-4 (its spacing is 2^-7); its master can, and the weight follows
    once the master has moved far enough."""
    w = torch.nn.Parameter(torch.ones(8))
    opt = MasterAdamW([w], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(3):
        w.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step()
    assert torch.all(w == 1.0) and torch.all(opt.state[w]["master"] < 1.0 - 2e-4)
    for _ in range(40):
        w.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step()
    assert torch.all(w < 1.0)


def test_state_dict_roundtrip_resumes_bitwise():
    batches = _batches(4)
    m = _model()
    opt = MasterAdamW(_groups(m), **HYPER)
    for x, y in batches[:2]:
        _step(m, opt, x, y)
    msd, osd = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    assert osd["state"][0]["master"].dtype == torch.float32
    losses_a = [_step(m, opt, x, y) for x, y in batches[2:]]
    m2 = _model(seed=5)
    opt2 = MasterAdamW(_groups(m2), **HYPER)
    m2.load_state_dict(msd)
    opt2.load_state_dict(osd)
    assert opt2.state[next(m2.parameters())]["master"].dtype == torch.float32  # not cast to the weights' bf16
    losses_b = [_step(m2, opt2, x, y) for x, y in batches[2:]]
    assert losses_a == losses_b
    for p, q in zip(opt.master_state_dict(m).values(), opt2.master_state_dict(m2).values()):
        assert p.dtype == torch.float32 and torch.equal(p, q)


def test_load_adamw_state_takes_the_weights_as_masters():
    src = _model()
    adamw = torch.optim.AdamW(_groups(src), **HYPER)
    _step(src, adamw, *_batches(1)[0])
    m = _model(seed=5)
    opt = MasterAdamW(_groups(m), **HYPER)
    m.load_state_dict(src.state_dict())  # rounds the fp32 weights into the bf16 parameters
    opt.load_state_dict(adamw.state_dict())
    p, q = next(m.parameters()), next(src.parameters())
    assert torch.equal(opt.state[p]["exp_avg"], adamw.state[q]["exp_avg"])
    assert torch.equal(opt.state[p]["master"], q.detach().to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="groups"):
        opt.load_state_dict({"state": {}, "param_groups": adamw.state_dict()["param_groups"][:1]})


def test_cast_chunks_bound_the_copies():
    ps = [torch.empty(n) for n in (5, 5, 3, 20, 1)]
    assert [[p.numel() for p in c] for c in _chunks(ps, 10)] == [[5, 5], [3], [20], [1]]


def test_trainer_choice_and_conflicts():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_bf16_weights(TrainConfig(), cpu) and uses_bf16_weights(TrainConfig(), cuda)
    assert not uses_bf16_weights(TrainConfig(optim=OptimConfig(name="muon")), cuda)
    assert not uses_bf16_weights(TrainConfig(optim=OptimConfig(ema_decay=0.9)), cuda)
    cfg = TrainConfig(optim=OptimConfig(bf16_weights="true"))
    cfg.validate()
    m = _model()
    opt = make_optimizer(m, cfg, cpu)
    assert isinstance(opt, MasterAdamW) and next(m.parameters()).dtype == torch.bfloat16
    for bad in (dict(name="muon"), dict(ema_decay=0.9), dict(bf16_weights="yes")):
        with pytest.raises(ConfigError, match="bf16_weights"):
            TrainConfig(optim=OptimConfig(**{"bf16_weights": "true", **bad})).validate()


def test_checkpoint_holds_the_masters_and_resumes_with_or_without_them(tmp_path):
    """model.pt holds the fp32 masters: a MasterAdamW run resumes bitwise, and an fp32 AdamW run resumes from
    exactly the masters (not their bf16 rounding) with no stale master state."""
    from app.train import checkpoint

    batches = _batches(3)
    m = _model()
    opt = MasterAdamW(_groups(m), **HYPER)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _step(m, opt, *batches[0])
    checkpoint.write(str(tmp_path / "c"), checkpoint.snapshot(m, opt, sched, checkpoint.TrainState()))
    masters = opt.master_state_dict(m)
    saved = torch.load(tmp_path / "c" / "model.pt")
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], v) for k, v in masters.items())
    after = [_step(m, opt, x, y) for x, y in batches[1:]]

    m2 = _model(seed=5)
    opt2 = MasterAdamW(_groups(m2), **HYPER)
    checkpoint.load(str(tmp_path / "c"), m2, opt2, restore_rng=False)
    assert [_step(m2, opt2, x, y) for x, y in batches[1:]] == after

    m3 = _model(seed=5)
    opt3 = torch.optim.AdamW(_groups(m3), **HYPER)
    checkpoint.load(str(tmp_path / "c"), m3, opt3, restore_rng=False)
    assert all(torch.equal(p, saved[k]) for k, p in m3.state_dict().items())
    assert all("master" not in st for st in opt3.state.values())


def test_step_runs_a_closure_with_gradients_on():
    m = _model()
    opt = MasterAdamW(_groups(m), **HYPER)
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in m.parameters()]

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = m(x, y)[1]
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and all(not torch.equal(p, b) for p, b in zip(m.parameters(), before))
