"""The weight average (app/train/ema.py): its arithmetic, the in-place swap, its checkpoint, and a run that
evaluates and exports it through Ray Train (tests/test_resilience.py checks its bitwise resume)."""
import contextlib
import os

import pytest
import torch

from app.train import checkpoint
from app.config import ConfigError
from app.train.ema import WeightEMA
from app.model.export import load_exported
from app.model.gpt import GPT, ModelConfig
from app.data.loader import TokenStream, eval_batches
from app.data.shards import load_manifest
from app.train.config import OptimConfig, TrainConfig
from app.train.loop import evaluate
from app.train.run import list_checkpoints, train
from tests.conftest import train_config


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=96, **kw))
    model.init_weights()
    return model


def perturb(model: GPT, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_update_follows_the_warmed_up_decay_and_counts_a_tied_matrix_once():
    model = tiny_model(tie_embeddings=True)
    ema = WeightEMA(model, decay=0.9)
    assert len(ema.shadow) == len(list(model.parameters()))  # the tied lm_head is not listed twice
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(20):
        perturb(model, n)
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.rate() == pytest.approx(d)
        ema.update()
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    for e, s in zip(expected, ema.shadow):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-6)


def test_swapped_holds_the_average_inside_and_restores_exactly():
    model = tiny_model()
    ema = WeightEMA(model, decay=0.5)
    for n in range(3):
        perturb(model, n)
        ema.update()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 96, (2, 16))
    with ema.swapped():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow))
        averaged_logits, _ = model(x)
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    own_logits, _ = model(x)
    assert not torch.allclose(averaged_logits, own_logits)


def test_state_dict_round_trip_and_shape_mismatch():
    model = tiny_model()
    ema = WeightEMA(model, decay=0.9)
    perturb(model, 1)
    ema.update()
    again = WeightEMA(tiny_model(), decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 1 and all(torch.equal(a, b) for a, b in zip(again.shadow, ema.shadow))
    other = WeightEMA(tiny_model(d_model=32), decay=0.9)
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(model, decay=1.0)


def test_config_checks():
    with pytest.raises(ConfigError, match="optim.ema_decay must be in"):
        TrainConfig(optim=OptimConfig(ema_decay=1.0)).validate()
    cfg = TrainConfig(optim=OptimConfig(ema_decay=0.99))
    cfg.validate()
    cfg.memory.fsdp = True
    with pytest.raises(ConfigError, match="optim.ema_decay averages"):
        cfg.validate()


def test_checkpoint_without_average_is_a_clear_error(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.write(str(tmp_path), checkpoint.snapshot(model, opt, sched, checkpoint.TrainState()))
    with pytest.raises(checkpoint.CheckpointError, match="without optim.ema_decay"):
        checkpoint.load(str(tmp_path), model, opt, sched, ema=WeightEMA(model, 0.9))


def test_run_evaluates_and_exports_the_average(shakespeare_shards, tmp_path):
    cfg = train_config(data=shakespeare_shards, storage=str(tmp_path / "runs"), name="ema", preset="tiny", seq_len=64,
                       micro_batch=4, max_steps=12, eval_every=6, eval_tokens=2048, log_every=6,
                       optim={"lr": 3e-3, "ema_decay": 0.8}, schedule={"warmup_steps": 3}, ckpt={"every": 6},
                       cluster={"cpus_per_worker": 0.5})
    result = train(cfg)
    assert result.error is None
    last = list_checkpoints(cfg.run_dir)[-1]
    raw, ema = torch.load(os.path.join(last, "model.pt")), torch.load(os.path.join(last, checkpoint.EMA))
    assert ema["updates"] == 12
    exported = load_exported(cfg.export_dir).model
    names = [n for n, _ in exported.named_parameters()]
    assert len(names) == len(ema["shadow"])
    for name, avg in zip(names, ema["shadow"]):  # the export is the average, not the raw weights
        weight = exported.state_dict()[name]
        assert torch.equal(weight, avg.to(weight.dtype))  # exports store the averages in their own dtype
    assert any(not torch.equal(raw[n], avg) for n, avg in zip(names, ema["shadow"]))
    # The reported validation loss is the average's, not the raw weights'.
    batches = eval_batches(TokenStream(load_manifest(shakespeare_shards), "val"), 64, 4, 2048, 0, 1)
    cpu = torch.device("cpu")
    averaged = evaluate(exported.float(), batches, cpu, contextlib.nullcontext)
    exported.load_state_dict(raw)
    assert result.metrics["val_loss"] == pytest.approx(averaged, rel=1e-5)
    assert abs(evaluate(exported, batches, cpu, contextlib.nullcontext) - averaged) > 1e-4
