"""The trainer's step function: eager on CPU (also when cuda_graph asks for a graph), and the whole
step captured as one CUDA graph matching the eager step (GPU)."""
import contextlib

import pytest
import torch

import app.fast.kernels
from app.config import ConfigError
from app.data.loader import Batch
from app.fast.accelerate import accelerate
from app.fast.config import PerfConfig
from app.fast.fp8 import fp8_weights_cast_once
from app.fast.step_graph import StepGraph
from app.model.gpt import GPT, ModelConfig
from app.train.config import TrainConfig
from app.train.optim import CosineSchedule, make_optimizer, optimizer_step
from app.train.step import add_grads, build_model, forward_backward, graph_fits, step_function
from tests.conftest import train_config

V, T, B = 96, 32, 4


def batches(n_steps: int, accum: int, device: str) -> list[list[Batch]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n_steps):
        idx = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(accum)]
        out.append([Batch(i[:, :-1].contiguous(), i[:, 1:].contiguous()) for i in idx])
    return out


def run(cfg: TrainConfig, device: str, steps: list[list[Batch]], autocast=contextlib.nullcontext):
    """(losses, grad norms, final weights) of `steps` through the trainer's step function."""
    dev = torch.device(device)
    mcfg = ModelConfig.preset("tiny", vocab_size=V, n_layer=2, d_model=64, n_head=4, max_seq_len=T)
    model = build_model(cfg, mcfg, dev)
    opt = make_optimizer(model, cfg, dev)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineSchedule(2, len(steps), 0.1))
    step = step_function(cfg, model, model, model, opt, dev, autocast, world=1)
    losses, norms = [], []
    for bs in steps:
        loss, norm = step(bs)
        sched.step()
        losses.append(float(loss))
        norms.append(float(norm))
    assert all(p.grad is None for p in model.parameters()) or isinstance(step, StepGraph)
    return losses, norms, [p.detach().float().cpu() for p in model.parameters()], step


def cfg(perf: dict | None = None, **kw) -> TrainConfig:
    return train_config({"optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2}, "perf": {"kernels": "none"}},
                        {"perf": perf or {}}, **kw)


def test_tuned_compile_mode_is_the_default_mode_with_coordinate_descent_tuning():
    """compile_mode=tuned: torch.compile's default mode plus an Inductor option that torch accepts (an unknown
    option name would raise at the first call), and it nests in the step's own CUDA graph."""
    from app.fast.compile import compile_kwargs
    cfg({"cuda_graph": "true", "compile_mode": "tuned"}).validate()
    double = torch.compile(lambda x: 2 * x + 1, **compile_kwargs("tuned"))
    assert double(torch.arange(4.0)).tolist() == [1.0, 3.0, 5.0, 7.0]
    with pytest.raises(ConfigError):
        cfg({"compile_mode": "fastest"})


def test_cuda_graph_does_not_nest_in_a_graphing_compile_mode():
    with pytest.raises(ConfigError, match="cuda_graph"):
        cfg({"cuda_graph": "true", "compile_mode": "reduce-overhead"})
    cfg({"cuda_graph": "true", "compile_mode": "max-autotune-no-cudagraphs"}).validate()


def test_auto_graphs_the_step_wherever_it_fits():
    cuda = torch.device("cuda")
    assert cfg().perf.cuda_graph == "auto"  # the default: the graphed step on one GPU
    assert graph_fits(cfg(), cuda, world=1)
    assert not graph_fits(cfg(), torch.device("cpu"), world=1)
    assert not graph_fits(cfg(), cuda, world=2)
    assert not graph_fits(cfg(memory={"fsdp": True}), cuda, world=1)
    assert not graph_fits(cfg(memory={"checkpointing": "full"}), cuda, world=1)
    assert not graph_fits(cfg({"compile_mode": "reduce-overhead"}), cuda, world=1)  # and auto does not raise there


def test_cuda_graph_takes_auto_true_false_and_yaml_booleans():
    assert cfg({"cuda_graph": True}).perf.cuda_graph == "true" and cfg({"cuda_graph": False}).perf.cuda_graph == "false"
    with pytest.raises(ConfigError, match="cuda_graph"):
        cfg({"cuda_graph": "sometimes"})


def _grads(model: GPT, steps: list[Batch], device: torch.device, autocast=contextlib.nullcontext,
           params=None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    forward_backward(model, steps, device, autocast, params=params)
    return [p.grad.clone() for p in model.parameters()]


def test_foreach_accumulation_equals_autograds_own():
    """One process sums the micro-batches' gradients with foreach adds: the same bits as autograd's
    accumulation, the tied embedding (two uses in one micro-batch) included."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=V, max_seq_len=T, tie_embeddings=True))
    model.init_weights()
    micro = batches(1, accum=3, device="cpu")[0]
    own = _grads(model, micro, torch.device("cpu"))
    foreach = _grads(model, micro, torch.device("cpu"), params=list(model.parameters()))
    assert len(own) == len(foreach) and all(torch.equal(a, b) for a, b in zip(own, foreach))
    assert all(g.abs().sum() > 0 for g in own)


def test_add_grads_sets_adds_and_skips():
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.ones(3)
    add_grads([a, b, c], (torch.full((3,), 2.0), torch.full((3,), 5.0), None))
    assert a.grad.tolist() == [3.0] * 3 and b.grad.tolist() == [5.0] * 3 and c.grad is None


def test_add_grads_gives_broadcast_gradients_the_parameters_layout():
    """A window-1 layer's q/k gradient comes back from autograd.grad as an expanded scalar; stored as is, the
    in-place clip of the first step raised (shakespeare_char with windows [1, 64, 0] on an H200)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=V, max_seq_len=T, n_layer=2, attn_windows=[1, 0]))
    model.init_weights()
    micro = batches(1, accum=2, device="cpu")[0]
    params = list(model.parameters())
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    q_grad = torch.autograd.grad(model(micro[0].inputs, micro[0].targets)[1], [q_proj])[0]
    assert 0 in q_grad.stride()  # what makes the case: a broadcast view
    model.zero_grad(set_to_none=True)
    forward_backward(model, micro, torch.device("cpu"), contextlib.nullcontext, params=params)
    assert all(p.grad.stride() == p.stride() for p in params)
    norm = optimizer_step(model, torch.optim.AdamW(params), grad_clip=1e-3)
    assert norm > 1e-3  # the clip ran, in place over every gradient


@pytest.mark.gpu
@pytest.mark.parametrize("windows", [[], [1, 0]])
def test_fp8_weights_cast_once_per_step_give_the_same_gradients_and_compile_once(windows):
    """Inside `fp8_weights_cast_once` the compiled FP8 model's gradients equal those of casting each weight in every
    micro-batch, and new casts each step are graph inputs, not a reason to recompile."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    dev = torch.device("cuda")
    torch._dynamo.reset()
    model = GPT(ModelConfig.preset("tiny", vocab_size=V, d_model=128, max_seq_len=T, attn_windows=windows))
    model.init_weights()
    model = accelerate(model, PerfConfig(kernels="none", fp8="all")).to(dev)
    fwd, cast = torch.compile(model), torch.compile(app.fast.kernels.fp8_weights)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    micro = [Batch(b.inputs.to(dev), b.targets.to(dev)) for b in batches(1, accum=2, device="cpu")[0]]
    inline = _grads(fwd, micro, dev, autocast)
    attn = model.model.layers[1].self_attn  # full attention (either way): q/k/v
    with fp8_weights_cast_once(model, cast):
        once = _grads(fwd, micro, dev, autocast)
        assert model.model.layers[0].mlp.down_proj.fp8_cast[0].dtype == torch.float8_e4m3fn
        assert attn.q_proj.fp8_cast[0].shape == (128, 128)
    assert model.model.layers[0].mlp.down_proj.fp8_cast is None and attn.q_proj.fp8_cast is None  # dropped after
    # The casts are the same bits, but the two compiled graphs differ (casts inside or graph inputs) and
    # Inductor may fuse (and so round) the activations around them differently: a few elements of a down_proj
    # gradient moved by up to an e4m3 step, so the bound is on the norm.
    for (name, _), a, b in zip(model.named_parameters(), inline, once):
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()
        assert err < 5e-3, f"{name}: cast once differs from casting inline by {err:.2e} of its norm"
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):
        with fp8_weights_cast_once(model, cast):
            _grads(fwd, micro, dev, autocast)
    assert counters["stats"]["unique_graphs"] == graphs


def test_fp8_weights_cast_once_casts_the_linears_that_run():
    """The weights `fp8_weights_cast_once` casts are the FP8 linears' (not a window-1 layer's q/k, which never run);
    off an FP8 GPU it casts nothing."""
    model = accelerate(GPT(ModelConfig.preset("tiny", vocab_size=V, max_seq_len=T, attn_windows=[1, 0])),
                       PerfConfig(kernels="none", fp8="all"))
    one, full = (model.model.layers[i].self_attn for i in (0, 1))
    fp8 = [m for m in model.modules() if type(m).__name__ == "Fp8Linear"]
    assert fp8 == [one.v_proj, one.o_proj, *model.model.layers[0].mlp.children(), full.q_proj, full.k_proj,
                   full.v_proj, full.o_proj, *model.model.layers[1].mlp.children()]
    cast = []
    with fp8_weights_cast_once(model, lambda ws: cast.append(ws) or []):  # CPU: nothing to cast
        pass
    assert cast == []


# AdamW on fp32 weights, AdamW over fp32 masters of bf16 weights (app/train/master.py), Muon
OPTIMIZERS = [dict(optim={"name": "adamw", "bf16_weights": "false"}), dict(optim={"name": "adamw", "bf16_weights": "true"}),
              dict(optim={"name": "muon"})]


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_cuda_graph_off_cuda_steps_eagerly_and_equals_the_plain_step(opt):
    steps = batches(4, accum=2, device="cpu")
    a = run(cfg({"cuda_graph": "false"}, **opt), "cpu", steps)
    b = run(cfg({"cuda_graph": "true"}, **opt), "cpu", steps)
    assert not isinstance(b[3], StepGraph)
    assert a[0] == b[0] and a[1] == b[1]
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert a[0][-1] < a[0][0]  # it trains


@pytest.mark.gpu
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_cuda_graph_step_matches_the_eager_step(opt):
    """Replays of the captured step (warm-up undone, LR from the scheduler each step, accumulation
    over 2 micro-batches) follow the eager step's losses and weights."""
    steps = batches(8, accum=2, device="cuda")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    eager = run(cfg({"cuda_graph": "false"}, **opt), "cuda", steps, autocast)  # (the default, auto, would graph it)
    graph = run(cfg({"cuda_graph": "true"}, **opt), "cuda", steps, autocast)
    assert isinstance(graph[3], StepGraph)
    # the first step must see the initial weights: the warm-up steps were undone
    assert graph[0][0] == pytest.approx(eager[0][0], rel=1e-3)
    torch.testing.assert_close(torch.tensor(graph[0]), torch.tensor(eager[0]), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.tensor(graph[1]), torch.tensor(eager[1]), rtol=5e-2, atol=5e-2)
    for x, y in zip(graph[2], eager[2]):
        torch.testing.assert_close(x, y, rtol=5e-2, atol=5e-3)
    assert graph[0][-1] < graph[0][0]
