"""The trainer's step function: eager on CPU (also when cuda_graph asks for a graph), and the whole
step captured as one CUDA graph matching the eager step (GPU)."""
import contextlib

import pytest
import torch

from app.config import ConfigError, from_dict
from app.data import Batch
from app.model import ModelConfig
from app.step_graph import StepGraph
from app.trainer import CosineSchedule, TrainConfig, build_model, graph_fits, make_optimizer, step_function

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


def cfg(**kw) -> TrainConfig:
    return from_dict(TrainConfig, {"lr": 3e-3, "warmup_steps": 2, "kernels": "none", **kw})


def test_cuda_graph_does_not_nest_in_a_graphing_compile_mode():
    with pytest.raises(ConfigError, match="cuda_graph"):
        cfg(cuda_graph="true", compile_mode="reduce-overhead").validate()
    cfg(cuda_graph="true", compile_mode="max-autotune-no-cudagraphs").validate()


def test_auto_graphs_the_step_wherever_it_fits():
    cuda = torch.device("cuda")
    assert cfg().cuda_graph == "auto"  # the default: the graphed step on one GPU
    assert graph_fits(cfg(), cuda, world=1)
    assert not graph_fits(cfg(), torch.device("cpu"), world=1)
    assert not graph_fits(cfg(), cuda, world=2)
    assert not graph_fits(cfg(memory={"fsdp": True}), cuda, world=1)
    assert not graph_fits(cfg(memory={"checkpointing": "full"}), cuda, world=1)
    assert not graph_fits(cfg(compile_mode="reduce-overhead"), cuda, world=1)  # and auto does not raise there


def test_cuda_graph_takes_auto_true_false_and_yaml_booleans():
    assert cfg(cuda_graph=True).cuda_graph == "true" and cfg(cuda_graph=False).cuda_graph == "false"
    with pytest.raises(ConfigError, match="cuda_graph"):
        cfg(cuda_graph="sometimes")


# AdamW on fp32 weights, AdamW over fp32 masters of bf16 weights (app/master.py), Muon
OPTIMIZERS = [dict(optimizer="adamw", bf16_weights="false"), dict(optimizer="adamw", bf16_weights="true"),
              dict(optimizer="muon")]


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_cuda_graph_off_cuda_steps_eagerly_and_equals_the_plain_step(opt):
    steps = batches(4, accum=2, device="cpu")
    a = run(cfg(**opt, cuda_graph="false"), "cpu", steps)
    b = run(cfg(**opt, cuda_graph="true"), "cpu", steps)
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
    eager = run(cfg(**opt, cuda_graph="false"), "cuda", steps, autocast)  # (the default, auto, would graph it)
    graph = run(cfg(**opt, cuda_graph="true"), "cuda", steps, autocast)
    assert isinstance(graph[3], StepGraph)
    # the first step must see the initial weights: the warm-up steps were undone
    assert graph[0][0] == pytest.approx(eager[0][0], rel=1e-3)
    torch.testing.assert_close(torch.tensor(graph[0]), torch.tensor(eager[0]), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.tensor(graph[1]), torch.tensor(eager[1]), rtol=5e-2, atol=5e-2)
    for x, y in zip(graph[2], eager[2]):
        torch.testing.assert_close(x, y, rtol=5e-2, atol=5e-3)
    assert graph[0][-1] < graph[0][0]
