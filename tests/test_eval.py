"""The kNN build (Ray tasks) and the eval job on a tiny dataset and a tiny model trained here: the plain
loss is the model's mean cross-entropy, a kNN index of the scored split itself lowers it (memorisation),
builds resume, LMatch variants are reported, and bad inputs are clear errors."""
import json
import os

import numpy as np
import pytest
import torch

from app.data.loader import TokenStream, eval_batches
from app.indexing.evaluate import EvalConfig, evaluate, load_model
from app.model.export import export_model
from app.indexing.knn_build import KnnBuildConfig, build_knn
from app.model.gpt import GPT, ModelConfig
from app.data.shards import Manifest, ShardFormatError, load_manifest, write_shard
from app.data.tokenizer import train_chars
from index import knn
from tests.conftest import SHARED_DATA

SEQ = 32


def _text() -> str:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if path.exists():
        return path.read_text()[:14000]
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "love", "thee", "my", "lord", "to", "be", "or", "not"]
    return " ".join(rng.choice(words, 3000))


def _dataset(root, text: str):
    """A dataset dir written directly: a char tokenizer, train in 2 shards (~10k tokens), val (~2k)."""
    os.makedirs(root, exist_ok=True)
    tok = train_chars([text])
    tok.save(os.path.join(root, "tokenizer.json"))
    ids = np.array(tok.encode(text).ids, dtype=np.uint16)
    cut = int(len(ids) * 0.85)
    parts = {"train": [ids[:cut // 2], ids[cut // 2:cut]], "val": [ids[cut:]]}
    shards = {split: [{"file": f"{split}_{i:03d}.bin", **write_shard(os.path.join(root, f"{split}_{i:03d}.bin"), a)}
                      for i, a in enumerate(arrs)] for split, arrs in parts.items()}
    m = Manifest(vocab_size=tok.get_vocab_size(), eot_id=0, shards=shards, root=str(root))
    m.save()
    return load_manifest(str(root))


def _train(manifest, steps: int = 100, **model_kw) -> GPT:
    """A tiny model fitted quickly on the train split (random windows, in-process)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=manifest.vocab_size, max_seq_len=64, **model_kw))
    model.init_weights()
    stream = TokenStream(manifest, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead (badly so on a busy 2-core machine)
    for _ in range(steps):
        starts = rng.integers(0, stream.n_tokens - SEQ - 1, 16)
        data = torch.from_numpy(np.stack([stream.read(int(s), SEQ + 1) for s in starts]))
        kw = {"lmatch": torch.full_like(data[:, :-1], manifest.vocab_size)} if model.cfg.lmatch_vocab else {}
        _, loss = model(data[:, :-1], data[:, 1:], **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    manifest = _dataset(str(d / "data"), _text())
    model = _train(manifest)
    export = str(d / "export")
    export_model(model, export, manifest.tokenizer_path, meta={"test": True})
    return {"data": str(d / "data"), "export": export, "manifest": manifest, "root": d}


def _direct_mean_ce(model: GPT, data: str, split: str, max_tokens: int = 0, lmatch=None) -> float:
    """Mean cross-entropy the plain way: the model's own loss over the same windows, token-weighted."""
    m = load_manifest(data)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in eval_batches(TokenStream(m, split), SEQ, 8, max_tokens, 0, 1, match=lmatch):
            kw = {"lmatch": b.lmatch} if lmatch is not None else {}
            if model.cfg.lmatch_vocab and lmatch is None:
                kw = {"lmatch": torch.full_like(b.inputs, model.cfg.vocab_size)}
            _, loss = model(b.inputs, b.targets, **kw)
            total += loss.item() * b.targets.numel()
            n += b.targets.numel()
    return total / n


def test_knn_lowers_the_loss_on_its_own_split_and_eval_equals_direct_ce(ray_session, tiny):
    meta = build_knn(KnnBuildConfig(model=tiny["export"], data=tiny["data"], windows_per_task=100, keep_keys=True,
                                    cpus_per_task=0.5))
    n_train = tiny["manifest"].num_tokens("train")
    assert meta["n"] == n_train - 1  # every position with a next token
    assert meta["kind"] == "flat" and meta["exact"] and meta["d"] == 64  # tiny: exact search
    assert meta["model"]["sha256"] == load_model(tiny["export"]).sha256 and meta["seq_len"] == 64
    knn_dir = os.path.join(tiny["export"], "knn")
    shards = sorted(f for f in os.listdir(os.path.join(knn_dir, "keys")) if f.startswith("keys_"))
    assert len(shards) == -(-(n_train - 1) // (100 * 64))  # one key shard per task of 100 windows

    # the stored values are the split's next tokens, in order
    values = np.load(os.path.join(knn_dir, knn.VALUES))
    assert np.array_equal(values, TokenStream(tiny["manifest"], "train").read(1, n_train - 1))

    on_train = evaluate(EvalConfig(model=tiny["export"], data=tiny["data"], split="train", seq_len=SEQ, k=8,
                                   max_tokens=4096))
    r = on_train["results"]
    model = load_model(tiny["export"]).model
    assert r["lm"]["loss"] == pytest.approx(_direct_mean_ce(model, tiny["data"], "train", 4096), rel=1e-5)
    assert r["lm"]["tokens"] == 4096 and on_train["knn_index"]["same_model"]
    # memorised: each position finds its own key (other window offset, so not bit-identical) -> lower loss
    assert r["knn"]["loss"] < r["lm"]["loss"] - 0.1, r
    assert r["knn"]["ppl"] == pytest.approx(np.exp(r["knn"]["loss"])) and r["knn"]["target_in_neighbours"] > 0.75
    assert len(r["knn"]["curve"]) == 5 and r["knn"]["lambda"] in (0.1, 0.2, 0.3, 0.4, 0.5)
    assert r["knn"]["loss"] == min(c["loss"] for c in r["knn"]["curve"])

    on_val = evaluate(EvalConfig(model=tiny["export"], data=tiny["data"], seq_len=SEQ, k=8, lambdas=[0.25]))
    assert on_val["results"]["lm"]["loss"] == pytest.approx(_direct_mean_ce(model, tiny["data"], "val"), rel=1e-5)
    assert on_val["results"]["lm"]["loss"] < np.log(tiny["manifest"].vocab_size)  # it learned something
    assert set(on_val["results"]) == {"lm", "knn"} and on_val["notes"] == []
    no_knn = evaluate(EvalConfig(model=tiny["export"], data=tiny["data"], seq_len=SEQ, knn="none"))
    assert set(no_knn["results"]) == {"lm"} and no_knn["knn_index"] is None


def test_build_resumes_and_ivfpq_through_ray(ray_session, tiny):
    out = str(tiny["root"] / "ivf")
    cfg = KnnBuildConfig(model=tiny["export"], data=tiny["data"], out=out, windows_per_task=80, kind="ivfpq",
                         nlist=16, m=8, train_sample=3000, parts=3, keep_keys=True, cpus_per_task=0.5, seq_len=SEQ)
    knn_dir = cfg.knn_dir()
    shard_dir = os.path.join(knn_dir, "keys")
    # a first run that embedded only some windows (as if it was stopped): shards 0 and 2 exist
    os.makedirs(shard_dir)
    from app.indexing.knn_build import embed_shard, plan_windows

    windows = plan_windows(tiny["manifest"].num_tokens("train"), SEQ, 0)
    groups = [windows[i:i + 80] for i in range(0, len(windows), 80)]
    for i in (0, 2):
        embed_shard(tiny["export"], tiny["data"], "train", groups[i], shard_dir, i, 8, "cpu", 1)
    before = {i: os.path.getmtime(knn.key_shard_paths(shard_dir, i)[0]) for i in (0, 2)}
    meta = build_knn(cfg)
    assert before == {i: os.path.getmtime(knn.key_shard_paths(shard_dir, i)[0]) for i in (0, 2)}  # reused
    assert meta["kind"] == "ivfpq" and meta["nlist"] == 16 and meta["m"] == 8 and meta["parts"] == 3
    assert meta["n"] == tiny["manifest"].num_tokens("train") - 1
    r = evaluate(EvalConfig(model=tiny["export"], data=tiny["data"], split="train", seq_len=SEQ, k=8,
                            knn=knn_dir, max_tokens=2048, nprobe=16))["results"]
    assert r["knn"]["loss"] < r["lm"]["loss"]  # approximate search still finds the memorised keys
    # a finished build is not redone; a build over other weights is refused
    assert build_knn(cfg) == meta
    other = str(tiny["root"] / "other")
    export_model(_train(tiny["manifest"], steps=2), other, tiny["manifest"].tokenizer_path)
    with pytest.raises(ValueError, match="other weights"):
        build_knn(KnnBuildConfig(**{**cfg.__dict__, "model": other}))
    with pytest.raises(ValueError, match="another build"):  # key shards of another plan are not mixed in
        os.remove(os.path.join(knn_dir, knn.META))
        build_knn(KnnBuildConfig(**{**cfg.__dict__, "seq_len": 16}))


def test_lmatch_model_variants(tiny, monkeypatch):
    manifest = tiny["manifest"]
    V = manifest.vocab_size
    model = _train(manifest, steps=30, lmatch_vocab=V + 1)
    export = str(tiny["root"] / "lm_export")
    export_model(model, export, manifest.tokenizer_path)
    res = evaluate(EvalConfig(model=export, data=tiny["data"], seq_len=SEQ, knn="none"))
    assert set(res["results"]) == {"lm"} and any("all-NONE" in n for n in res["notes"])
    assert res["results"]["lm"]["loss"] == pytest.approx(_direct_mean_ce(model, tiny["data"], "val"), rel=1e-5)

    # with the dataset's ids (faked here: the previous token as the "match"), the 'lmatch' variant appears
    import app.indexing.evaluate as ev

    def fake_stream(m, split):
        arrays = [np.where(np.arange(len(a)) % 3 == 0, V, np.roll(np.asarray(a), 1)).astype(np.int64)
                  for a in TokenStream(m, split).shards]
        return TokenStream(m, split, arrays=arrays)

    monkeypatch.setattr(ev, "match_stream", fake_stream)
    res = evaluate(EvalConfig(model=export, data=tiny["data"], seq_len=SEQ, knn="none"))
    assert set(res["results"]) == {"lm", "lmatch"}
    direct = _direct_mean_ce(model, tiny["data"], "val", lmatch=fake_stream(load_manifest(tiny["data"]), "val"))
    assert res["results"]["lmatch"]["loss"] == pytest.approx(direct, rel=1e-5)
    assert res["results"]["lmatch"]["loss"] != res["results"]["lm"]["loss"]
    # a plain model ignores the dataset's ids, and says so
    res = evaluate(EvalConfig(model=tiny["export"], data=tiny["data"], seq_len=SEQ, knn="none"))
    assert set(res["results"]) == {"lm"} and any("no lmatch table" in n for n in res["notes"])


def test_jobs_print_json_and_fail_clearly(ray_session, tiny, tmp_path, capsys):
    from jobs import build_knn as build_job
    from jobs import eval as eval_job

    out = str(tmp_path / "e.json")
    assert eval_job.main([f"--model={tiny['export']}", f"--data={tiny['data']}", "--seq_len=32", "--max_tokens=1024",
                          "--lambdas=0.2,0.4", "--k=4", f"--output={out}", f"--tensorboard={tmp_path / 'tb'}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(open(out).read())
    assert printed["tokens"] == 1024 and [c["lambda"] for c in printed["results"]["knn"]["curve"]] == [0.2, 0.4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    lm_loss = next(t for t in events.Tags()["scalars"] if t.startswith("results/lm/") and t.endswith("loss"))
    assert events.Scalars(lm_loss)[0].value == pytest.approx(printed["results"]["lm"]["loss"])

    assert eval_job.main([f"--model={tmp_path / 'none'}", f"--data={tiny['data']}"]) == 2  # refused before any work
    assert "no model here" in capsys.readouterr().err
    assert eval_job.main([f"--model={tiny['export']}", f"--data={tmp_path / 'none'}"]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert build_job.main([f"--model={tmp_path / 'none'}", f"--data={tiny['data']}"]) == 2
    assert "no model here" in capsys.readouterr().err
    assert build_job.main([f"--model={tiny['export']}", f"--data={tmp_path / 'none'}"]) == 2
    assert "no manifest" in capsys.readouterr().err
    # finished already: the job prints the index summary as JSON
    assert build_job.main([f"--model={tiny['export']}", f"--data={tiny['data']}"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "flat"
    with pytest.raises(ShardFormatError):
        evaluate(EvalConfig(model=tiny["export"], data=str(tmp_path)))


def test_run_dir_without_export_loads_its_newest_checkpoint(tiny, tmp_path):
    from app.train import checkpoint
    from app.config import to_dict
    from app.train.config import TrainConfig

    model = _train(tiny["manifest"], steps=3)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = tmp_path / "run"
    cfg = TrainConfig(data=tiny["data"], model={"max_seq_len": 64})
    for step in (5, 10):
        state = checkpoint.TrainState(step=step, config=to_dict(cfg))
        checkpoint.write(str(run / f"checkpoint_{step:08d}"), checkpoint.snapshot(model, opt, sched, state))
    os.makedirs(run / "checkpoint_00000020")  # unfinished (no DONE): ignored
    lm = load_model(str(run))
    assert lm.kind == "checkpoint" and lm.source.endswith("checkpoint_00000010") and lm.meta == {"step": 10}
    x = torch.randint(0, tiny["manifest"].vocab_size, (2, 16))
    assert torch.equal(lm.model(x)[0], model(x)[0])
    res = evaluate(EvalConfig(model=str(run), data=tiny["data"], seq_len=SEQ, knn="none", max_tokens=512))
    assert res["model"]["kind"] == "checkpoint"
    assert res["results"]["lm"]["loss"] == pytest.approx(_direct_mean_ce(model, tiny["data"], "val", 512), rel=1e-5)


def test_all_four_variants_with_a_real_lmatch_index(ray_session, tiny, tmp_path):
    """With the dataset's LMatch index (app/indexing/lmatch_build.py) and an lmatch model: lm, lmatch, knn, lmatch+knn."""
    import shutil

    from app.indexing.lmatch_build import IndexConfig
    from app.indexing.lmatch_build import build_index as build_lmatch

    data = str(tmp_path / "data")
    shutil.copytree(tiny["data"], data)
    build_lmatch(IndexConfig(data=data), use_ray=False)
    manifest = load_manifest(data)
    model = _train(manifest, steps=30, lmatch_vocab=manifest.vocab_size + 1)
    export = str(tmp_path / "export")
    export_model(model, export, manifest.tokenizer_path)
    meta = build_knn(KnnBuildConfig(model=export, data=data, windows_per_task=200, cpus_per_task=0.5))
    assert meta["lmatch"] == "ids"  # the keys were computed with the train split's match ids
    res = evaluate(EvalConfig(model=export, data=data, seq_len=SEQ, k=8))
    assert set(res["results"]) == {"lm", "lmatch", "knn", "lmatch+knn"}
    from app.data.loader import match_stream

    direct = _direct_mean_ce(model, data, "val", lmatch=match_stream(manifest, "val"))
    assert res["results"]["lmatch"]["loss"] == pytest.approx(direct, rel=1e-5)
