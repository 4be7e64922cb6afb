"""Training through Ray Train: the loss drops on real text; a killed worker resumes from its checkpoint."""
import math
import os
import signal
import threading
import time

import pytest
import torch

from app import storage
from app.train import checkpoint
from app.config import ConfigError
from app.data.loader import TokenStream, eval_batches
from app.model.export import load_exported
from app.model.gpt import GPT
from app.data.shards import load_manifest
from app.train.config import TrainConfig, model_config
from app.train.run import list_checkpoints, train
from tests.conftest import train_config


def train_cfg(data, tmp_path, **kw) -> TrainConfig:
    """A small, fast training config on the shakespeare shards."""
    base = dict(data=data, storage=str(tmp_path / "runs"), name="t", preset="tiny", seq_len=64, micro_batch=8,
                eval_tokens=4096, log_every=10, optim={"lr": 3e-3}, schedule={"warmup_steps": 5},
                cluster={"cpus_per_worker": 0.5})
    return train_config(base, **kw)


def _val_loss(model: GPT, data: str, seq_len: int) -> float:
    m = load_manifest(data)
    batches = eval_batches(TokenStream(m, "val"), seq_len, 8, 4096, 0, 1)
    with torch.no_grad():
        losses = [model(x, y)[1].item() for x, y, _ in batches]
    return sum(losses) / len(losses)


def test_loss_drops_on_shakespeare(shakespeare_shards, tmp_path):
    cfg = train_cfg(shakespeare_shards, tmp_path, max_steps=80, eval_every=40, ckpt={"every": 40})
    result = train(cfg)
    assert result.error is None
    torch.manual_seed(cfg.seed)
    untrained = GPT(model_config(cfg, load_manifest(shakespeare_shards).vocab_size))
    untrained.init_weights()
    before = _val_loss(untrained, shakespeare_shards, 64)
    trained = load_exported(cfg.export_dir).model
    after = _val_loss(trained, shakespeare_shards, 64)
    assert before > math.log(1024) - 0.5  # an untrained model is near-uniform
    assert after < before - 1.0, (before, after)
    assert result.metrics["val_loss"] == pytest.approx(after, rel=1e-3)
    assert [os.path.basename(p) for p in list_checkpoints(cfg.run_dir)] == ["checkpoint_00000040", "checkpoint_00000080"]
    # what a user watches beside the checkpoints: progress.json, TensorBoard events, the loss curve
    progress = storage.read_json(storage.join(cfg.run_dir, "progress.json"))
    assert progress["step"] == 80 and progress["workers"] == 1 and progress["tokens"] == 80 * 8 * 64
    assert list((tmp_path / "runs" / "t" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "runs" / "t" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_worker_restarts_from_checkpoint(shakespeare_shards, tmp_path, train_worker_pids):
    cfg = train_cfg(shakespeare_shards, tmp_path, max_steps=40, ckpt={"every": 5}, eval_every=0,
                    cluster={"max_failures": 2})
    killed = []

    def kill_after_two_checkpoints():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            # Two on storage: the first is surely registered with Ray (uploads are asynchronous).
            if len(list_checkpoints(cfg.run_dir)) >= 2 and (pids := train_worker_pids()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.2)

    t = threading.Thread(target=kill_after_two_checkpoints, daemon=True)
    t.start()
    result = train(cfg)
    t.join()
    assert killed, "no training worker was found to kill"
    assert result.error is None
    assert result.metrics["step"] == 40
    assert result.metrics["resumes"] >= 1  # it restarted from a checkpoint, not from scratch
    last = list_checkpoints(cfg.run_dir)[-1]
    assert checkpoint.is_complete(last) and last.endswith("checkpoint_00000040")


def test_existing_run_needs_resume_and_resume_continues(shakespeare_shards, tmp_path):
    cfg = train_cfg(shakespeare_shards, tmp_path, max_steps=10, ckpt={"every": 10}, eval_every=0, export="none")
    assert train(cfg).error is None
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)
    cfg.resume, cfg.max_steps = True, 20
    result = train(cfg)
    assert result.error is None and result.metrics["step"] == 20 and result.metrics["resumes"] == 1


def test_bf16_weights_checkpoint_and_export_the_fp32_masters(shakespeare_shards, tmp_path):
    cfg = train_cfg(shakespeare_shards, tmp_path, max_steps=20, ckpt={"every": 10}, eval_every=0,
                    optim={"bf16_weights": "true"})
    result = train(cfg)
    assert result.error is None and result.metrics["train_loss"] < math.log(1024) - 0.5  # it learns
    last = list_checkpoints(cfg.run_dir)[-1]
    weights = torch.load(os.path.join(last, "model.pt"), map_location="cpu")
    masters = torch.load(os.path.join(last, "optimizer.pt"), map_location="cpu")["state"]
    exported = load_exported(cfg.export_dir).model.state_dict()
    assert all(w.dtype == torch.float32 and torch.equal(exported[k], w) for k, w in weights.items())
    assert {i: st["master"] for i, st in masters.items()}  # the optimizer state keeps them too (exact resume)
    # masters, not bf16 weights: they carry the bits bf16 drops
    assert any(not torch.equal(w.to(torch.bfloat16).float(), w) for w in weights.values())
    cfg.resume, cfg.max_steps, cfg.optim.bf16_weights = True, 30, "false"  # resumes with fp32 weights from the masters
    result = train(cfg)
    assert result.error is None and result.metrics["step"] == 30 and result.metrics["resumes"] == 1


def test_bf16_weights_under_ddp_two_workers(shakespeare_shards, tmp_path):
    """Two DDP workers train with bf16 gradients all-reduced (gloo here, NCCL on GPUs); the checkpoint and the
    export hold rank 0's fp32 masters."""
    cfg = train_cfg(shakespeare_shards, tmp_path, max_steps=10, ckpt={"every": 10}, eval_every=0,
                    cluster={"num_workers": 2}, optim={"bf16_weights": "true"})
    result = train(cfg)
    assert result.error is None and result.metrics["step"] == 10
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] < math.log(1024)
    exported = load_exported(cfg.export_dir).model.state_dict()
    weights = torch.load(os.path.join(list_checkpoints(cfg.run_dir)[-1], "model.pt"), map_location="cpu")
    assert all(v.dtype == torch.float32 and torch.equal(exported[k], v) for k, v in weights.items())


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="manifest"):
        train(train_cfg(str(tmp_path / "nothing"), tmp_path, max_steps=1))


def test_checkpoints_and_export_on_s3(s3_server, shakespeare_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTLM_CACHE", str(tmp_path / "cache"))
    cfg = train_cfg(shakespeare_shards, tmp_path, storage=f"{s3_server}/runs-{os.getpid()}", name="s3run",
                    max_steps=10, ckpt={"every": 5}, eval_every=0)
    assert train(cfg).error is None
    assert [p.rsplit("/", 1)[1] for p in list_checkpoints(cfg.run_dir)] == ["checkpoint_00000005", "checkpoint_00000010"]
    assert cfg.export_dir.startswith("s3://") and load_exported(cfg.export_dir).config.n_layer == 2
    cfg.resume, cfg.max_steps = True, 15
    result = train(cfg)
    assert result.error is None and result.metrics["step"] == 15 and result.metrics["resumes"] == 1


def test_unreachable_storage_fails_fast(shakespeare_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage._s3_fs.cache_clear()
    try:
        with pytest.raises(ConfigError, match="unreachable"):
            train(train_cfg(shakespeare_shards, tmp_path, storage="s3://nowhere/runs", max_steps=1))
    finally:
        storage._s3_fs.cache_clear()


def test_index_feeds_lmatch_ids(shakespeare_shards, tmp_path):
    """--index: batches carry the LMatch ids of their input tokens, the model gets a vocab+1 table,
    and the retrieval feature lowers the validation loss of the same short run."""
    import shutil

    from app.data.loader import BatchPlan, TrainLoader
    from app.indexing.lmatch_build import IndexConfig, build_index
    from app.data.loader import match_stream
    from index.lmatch import lmatch_paths, read_lmatch

    data = str(tmp_path / "shards")
    shutil.copytree(shakespeare_shards, data, ignore=shutil.ignore_patterns("*.lmatch*", "*.lmsa"))
    unindexed = load_manifest(data)  # the shared fixture may have been indexed by another test
    unindexed.extras.pop("lmatch", None)
    unindexed.save()
    with pytest.raises(ConfigError, match="jobs.build_index"):
        train(train_cfg(data, tmp_path, index=True, max_steps=2))
    build_index(IndexConfig(data=data), use_ray=False)
    m = load_manifest(data)
    loader = TrainLoader(TokenStream(m, "train"), 64, BatchPlan(8, 8, 1), 0, seed=3, match=match_stream(m, "train"))
    tokens = TokenStream(m, "train")
    ids = torch.from_numpy(read_lmatch(lmatch_paths(m, "train")[0])[0].astype("int64"))
    for b in loader.micro_batches(5):
        for row_x, row_m in zip(b.inputs, b.lmatch):
            start = next(s for s in range(0, tokens.n_tokens, 64) if torch.equal(torch.from_numpy(tokens.read(s, 64)), row_x))
            assert torch.equal(row_m, ids[start:start + 64])

    plain = train(train_cfg(data, tmp_path, name="plain", max_steps=60, eval_every=0, ckpt={"every": 60}))
    indexed = train(train_cfg(data, tmp_path, name="indexed", index=True, max_steps=60, eval_every=0,
                              ckpt={"every": 60}))
    model = load_exported(train_cfg(data, tmp_path, name="indexed").export_dir).model
    assert model.cfg.lmatch_vocab == m.vocab_size + 1
    assert indexed.metrics["val_loss"] < plain.metrics["val_loss"] - 0.05, (indexed.metrics, plain.metrics)
