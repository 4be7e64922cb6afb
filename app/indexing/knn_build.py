"""Build a model's kNN-LM index with Ray: embed the train split in parallel tasks (one per range of
windows, CPU or GPU) into key/value shards, train the quantizer on a sample, add the shards in parallel
parts, merge them on disk (index/knn.py does the FAISS work), meta.json last.

Layout of `<out>/knn/`: `keys/plan.json` (what the shards are of) and `keys/{keys,values}_NNNNN.npy`, then
the index files of index/knn.py. A rerun skips finished key shards, the trained index and finished parts;
once meta.json is there the build is done. Paths must be local (or a filesystem every node mounts).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

from app import storage
from app.config import ConfigError, to_dict
from app.log import get_logger
from app.data.shards import load_manifest

log = get_logger(__name__)


@dataclass
class KnnBuildConfig:
    """kNN-LM datastore of a model over a dataset split: keys = final hidden states, values = next tokens."""

    model: str = "runs/spotlm-run/export"  # export dir, or a run dir (its export, else its newest checkpoint)
    data: str = "runs/shards"  # tokenized dataset dir (manifest.json)
    out: str = ""  # the index goes to <out>/knn/; "" = the model directory given
    split: Literal["train", "val"] = "train"  # which split to store
    max_tokens: int = 0  # store only the first N positions of the split; 0 = all of them
    seq_len: int = 0  # window length for the forward passes; 0 = the model's max_seq_len
    windows_per_task: int = 64  # windows per Ray task (= per key shard)
    batch: int = 8  # windows per forward inside a task
    kind: Literal["auto", "ivfpq", "flat"] = "auto"  # auto: ivfpq, or the exact flat index below exact_below keys
    exact_below: int = 32768  # auto: fewer keys than this get the exact flat index
    metric: Literal["l2", "ip"] = "l2"  # distance: squared L2, or inner product
    nlist: int = 0  # IVF cells; 0 = a power of two near 4 sqrt(n)
    m: int = 0  # PQ bytes per key; 0 = largest divisor of d up to min(64, d/2)
    train_sample: int = 0  # keys the quantizer trains on; 0 = max(64 nlist, 16384, 20000), at most n
    parts: int = 0  # parallel add tasks (index parts merged on disk); 0 = one per key shard, at most 16
    use_gpu: Literal["auto", "true", "false"] = "auto"  # embed on GPUs (auto: if the cluster has GPUs)
    cpus_per_task: float = 1.0  # CPU resources each task reserves (torch / faiss threads follow it)
    keep_keys: bool = False  # keep the key shards after the merge (else only the index and values stay)
    seed: int = 0  # training sample and k-means seed

    def validate(self) -> None:
        if self.windows_per_task < 1 or self.batch < 1 or self.max_tokens < 0 or self.seq_len < 0:
            raise ConfigError("windows_per_task and batch must be >= 1; max_tokens and seq_len >= 0")
        if self.cpus_per_task <= 0:
            raise ConfigError("cpus_per_task must be > 0")
        if storage.is_s3(self.out or self.model):
            raise ConfigError("the kNN index is written to local disk: give --out a local (or shared) directory")

    def knn_dir(self) -> str:
        return os.path.join(storage.absolute(self.out or self.model), "knn")


def plan_windows(n_tokens: int, seq_len: int, max_tokens: int) -> list[tuple[int, int]]:
    """(start, length) windows covering every position that has a next token (the last one may be shorter)."""
    positions = n_tokens - 1
    if max_tokens:
        positions = min(positions, max_tokens)
    return [(s, min(seq_len, positions - s)) for s in range(0, max(positions, 0), seq_len)]


def embed_shard(model_path: str, data: str, split: str, windows: list[tuple[int, int]], shard_dir: str, i: int,
                batch: int, device: str, threads: int) -> int:
    """One task: the model over `windows`, written as key shard `i`. Returns its row count."""
    import torch

    from app.data.loader import TokenStream
    from app.data.loader import match_stream
    from app.indexing.evaluate import embed_windows, load_model
    from index.knn import key_shard_done, read_key_shard, write_key_shard

    if key_shard_done(shard_dir, i):
        return len(read_key_shard(shard_dir, i)[1])
    torch.set_num_threads(max(1, threads))
    manifest = load_manifest(data)
    lm = load_model(model_path, device, data=data)
    match = match_stream(manifest, split) if lm.config.lmatch_vocab else None
    keys, values = embed_windows(lm.model, TokenStream(manifest, split), match, windows, batch, device)
    write_key_shard(shard_dir, i, keys, values)
    return len(values)


def build_knn(cfg: KnnBuildConfig) -> dict[str, Any]:
    """Build (or finish) `<out>/knn/`; returns its meta. Runs on the Ray that is initialised (or starts one)."""
    import ray

    from app.data.loader import match_stream
    from app.indexing.evaluate import load_model, resolve_model
    from index import knn

    t0 = time.perf_counter()
    manifest = load_manifest(cfg.data)  # ShardFormatError when it is not a dataset
    if not manifest.shards.get(cfg.split):
        raise ValueError(f"{manifest.root}: split {cfg.split!r} has no shards")
    cfg.validate()
    kind, src = resolve_model(cfg.model)  # FileNotFoundError when there is no model
    lm = load_model(src, "cpu", data=cfg.data)  # config and checksum for the plan and the meta
    model_info = lm.describe()
    seq_len = cfg.seq_len or lm.config.max_seq_len
    if seq_len > lm.config.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_seq_len={lm.config.max_seq_len}")
    out_dir = cfg.knn_dir()
    lmatch_mode = ("ids" if match_stream(manifest, cfg.split) is not None else "none") if lm.config.lmatch_vocab else None
    del lm

    # ---- a finished index, or a plan that must match the one on disk ----
    if os.path.exists(os.path.join(out_dir, knn.META)):
        meta = knn.read_meta(out_dir)
        if meta.get("model", {}).get("sha256") != model_info["sha256"]:
            raise ConfigError(f"{out_dir} holds an index of other weights: remove it or pick another --out")
        log.info("%s is already built (%d keys)", out_dir, meta["n"])
        return meta
    windows = plan_windows(manifest.num_tokens(cfg.split), seq_len, cfg.max_tokens)
    if not windows:
        raise ValueError(f"split {cfg.split!r} has too few tokens for a datastore")
    groups = [windows[i:i + cfg.windows_per_task] for i in range(0, len(windows), cfg.windows_per_task)]
    shard_dir = os.path.join(out_dir, "keys")
    plan = {"model_sha256": model_info["sha256"], "data": manifest.root, "split": cfg.split, "seq_len": seq_len,
            "positions": sum(n for _, n in windows), "windows_per_task": cfg.windows_per_task, "lmatch": lmatch_mode}
    plan_path = os.path.join(shard_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if old != plan:
            diff = {k: (old.get(k), v) for k, v in plan.items() if old.get(k) != v}
            raise ConfigError(f"{shard_dir} holds key shards of another build {diff}: remove {out_dir} to start over")
    else:
        os.makedirs(shard_dir, exist_ok=True)
        storage.write_json(plan_path, plan)

    # ---- embed: one Ray task per group of windows ----
    use_gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    threads = max(1, math.floor(cfg.cpus_per_task))
    todo = [i for i in range(len(groups)) if not knn.key_shard_done(shard_dir, i)]
    log.info("kNN datastore of %s on %s/%s: %d positions in %d shards (%d to embed, %s)", src, manifest.root,
             cfg.split, plan["positions"], len(groups), len(todo), "GPU" if use_gpu else "CPU")
    task = ray.remote(embed_shard).options(num_cpus=cfg.cpus_per_task, num_gpus=1 if use_gpu else 0,
                                           max_retries=2)
    refs = [task.remote(src, manifest.root, cfg.split, groups[i], shard_dir, i, cfg.batch,
                        "cuda" if use_gpu else "cpu", threads) for i in todo]
    ray.get(refs)
    t_embed = time.perf_counter() - t0

    # ---- train, add in parallel parts, merge on disk, meta last ----
    add = ray.remote(knn.add_part).options(num_cpus=cfg.cpus_per_task, max_retries=2)

    def ray_map(fn, *iterables):
        return ray.get([add.remote(*args, threads) for args in zip(*iterables)])

    meta = knn.build_index(
        shard_dir, len(groups), out_dir, kind=cfg.kind, nlist=cfg.nlist, m=cfg.m, metric=cfg.metric,
        exact_below=cfg.exact_below, train_sample=cfg.train_sample, n_parts=cfg.parts, seed=cfg.seed,
        map_fn=ray_map, log=log.info,
        extra_meta={"model": {k: model_info[k] for k in ("source", "kind", "sha256", "params")}
                    | {"d_model": model_info["config"]["d_model"], "n_layer": model_info["config"]["n_layer"]},
                    "data": manifest.root, "split": cfg.split, "seq_len": seq_len, "lmatch": lmatch_mode,
                    "config": to_dict(cfg), "embed_seconds": round(t_embed, 3),
                    "seconds": round(time.perf_counter() - t0, 3)})
    if not cfg.keep_keys:
        for i in range(len(groups)):  # the index and values.npy hold what is needed; plan.json stays
            for path in knn.key_shard_paths(shard_dir, i):
                os.remove(path)
    log.info("built %s: %d keys, %s, in %.1f s", out_dir, meta["n"], meta["kind"], time.perf_counter() - t0)
    return meta
