"""Build the LMatch index of a tokenized dataset with parallel Ray tasks (one task per shard).

Each piece (one shard of train or val) is computed by `index.lmatch.compute_shard` in a Ray task:
the shard is cut into chunks of `chunk_tokens`; every chunk is matched jointly with each earlier
train chunk (val: with every train chunk), and the answers merge by (longer, then earlier), so
the result is identical to one pass over the whole split. A piece writes, atomically,
`<shard>.lmatch` (+ `<shard>.lmsa` for train), then its completion record
`<shard>.lmatch.done.json` (build id, sha256 of the files, stats). A rerun skips every piece
whose record matches the current build id and whose files are intact; the manifest
(`extras["lmatch"]`) is written last.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from app import storage
from app.config import ConfigError
from app.log import get_logger
from app.shards import ShardFormatError, load_manifest, read_shard

log = get_logger(__name__)


@dataclass
class IndexConfig:
    """Build the exact-match (LMatch) index of a tokenized dataset."""

    data: str = "runs/shards"  # dataset directory (manifest.json), local or s3://
    workers: int = 0  # parallel Ray tasks (0 = one per CPU of the cluster)
    chunk_tokens: int = 1 << 20  # tokens per chunk matched jointly (memory ~ 200 bytes x 2 chunks)
    verify: bool = True  # check every shard's sha256 against the manifest
    splits: list[str] = field(default_factory=lambda: ["train", "val"])  # splits to index

    def validate(self) -> None:
        if self.chunk_tokens < 1:
            raise ConfigError("chunk_tokens must be >= 1")
        if self.workers < 0:
            raise ConfigError("workers must be >= 0")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_path(root: str, shard_file: str) -> str:
    return storage.join(root, shard_file + ".lmatch.done.json")


def _piece_done(root: str, split: str, shard: dict, bid_hex: str) -> dict | None:
    """The completion record of a piece if it is complete for this build id, else None."""
    from index import lmatch

    try:
        rec = storage.read_json(_record_path(root, shard["file"]))
    except (FileNotFoundError, ValueError):
        return None
    if rec.get("build_id") != bid_hex or rec.get("shard_sha256") != shard.get("sha256"):
        return None
    try:
        h = lmatch.read_lmatch_header(storage.join(root, rec["file"]))
        if h["n_tokens"] != shard["n_tokens"] or h["build_id"].hex() != bid_hex:
            return None
        if split == "train":
            s = lmatch.read_sa_header(storage.join(root, rec["sa_file"]))
            if s["n_tokens"] != shard["n_tokens"] or s["build_id"].hex() != bid_hex:
                return None
    except (ShardFormatError, KeyError):
        return None
    return rec


def build_piece(root: str, split: str, k: int, chunk_tokens: int, verify: bool) -> dict[str, Any]:
    """Compute and write one piece (shard k of split); returns its completion record."""
    import numpy as np

    from index import lmatch

    m = load_manifest(root)
    t0 = time.time()
    nxt, ln, sa = lmatch.compute_shard(m, split, k, chunk_tokens, verify=verify)
    bid = lmatch.build_id(m)
    shard = m.shards[split][k]
    rec: dict[str, Any] = {"split": split, "shard": shard["file"], "shard_sha256": shard.get("sha256"),
                           "build_id": bid.hex(), "n_tokens": int(len(nxt)), "matched": int(np.count_nonzero(ln)),
                           "len_sum": int(ln.sum(dtype=np.int64)), "seconds": round(time.time() - t0, 3)}
    data = lmatch.encode_lmatch(nxt, ln, m.vocab_size, bid)
    rec["file"] = shard["file"] + lmatch.LMATCH_SUFFIX
    storage.write_bytes(storage.join(root, rec["file"]), data)
    rec["sha256"], rec["bytes"] = _sha(data), len(data)
    if sa is not None:
        sdata = lmatch.encode_sa(sa, len(nxt), m.vocab_size, bid)
        rec["sa_file"] = shard["file"] + lmatch.SA_SUFFIX
        storage.write_bytes(storage.join(root, rec["sa_file"]), sdata)
        rec["sa_sha256"], rec["sa_bytes"] = _sha(sdata), len(sdata)
    storage.write_json(_record_path(root, shard["file"]), rec)  # last: marks the piece done
    return rec


def _check_shards(m, splits: list[str]) -> None:
    """Fail fast, with the path, on missing / truncated / wrong-dtype shards (headers only)."""
    import numpy as np

    want = np.dtype(m.dtype).itemsize
    for split in splits:
        for path, info in zip(m.shard_paths(split), m.shards.get(split, [])):
            arr = read_shard(path)
            if arr.dtype.itemsize != want:
                raise ShardFormatError(f"{path}: {arr.dtype.itemsize}-byte tokens, manifest says {m.dtype}")
            if len(arr) != int(info["n_tokens"]):
                raise ShardFormatError(f"{path}: {len(arr)} tokens, manifest says {info['n_tokens']}")


def _unwrap(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def build_index(cfg: IndexConfig, use_ray: bool = True) -> dict[str, Any]:
    """Build (or finish, or confirm) the LMatch index of `cfg.data`; returns a summary dict.

    use_ray=False computes the pieces in this process (the single-process path)."""
    from index import lmatch

    cfg.validate()
    t0 = time.time()
    root = storage.absolute(cfg.data)
    m = load_manifest(root)
    splits = [s for s in cfg.splits if m.shards.get(s)]
    if m.vocab_size <= 0:
        raise ShardFormatError(f"{root}: manifest has no vocab_size")
    _check_shards(m, splits)
    bid = lmatch.build_id(m).hex()
    todo, records = [], {}
    for split in splits:
        for k, shard in enumerate(m.shards[split]):
            rec = _piece_done(root, split, shard, bid)
            if rec is None:
                todo.append((split, k))
            else:
                records[(split, k)] = rec
    log.info("lmatch %s: %d pieces to build, %d already done", root, len(todo), len(records))
    built = []
    if todo and use_ray:
        import ray

        from app.ray_env import init_ray

        init_ray()
        workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1, max_retries=2)(build_piece)
        # Larger pieces first (a train piece matches against every earlier chunk).
        order = sorted(todo, key=lambda sk: (sk[0] != "val", sk[1]), reverse=True)
        pending: dict[Any, tuple[str, int]] = {}
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc="lmatch pieces", unit="piece", disable=len(order) < 4)
        try:
            while order or pending:
                while order and len(pending) < workers:
                    sk = order.pop(0)
                    pending[task.remote(root, sk[0], sk[1], cfg.chunk_tokens, cfg.verify)] = sk
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    sk = pending.pop(ref)
                    try:
                        records[sk] = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        err = _unwrap(e)
                        if isinstance(err, (ShardFormatError, ValueError)):
                            raise type(err)(str(err)) from None
                        raise
                    built.append(sk)
                    bar.update(1)
        finally:
            bar.close()
            for ref in pending:
                ray.cancel(ref)
    else:
        for sk in todo:
            records[sk] = build_piece(root, sk[0], sk[1], cfg.chunk_tokens, cfg.verify)
            built.append(sk)
    extras = {
        "version": lmatch.FORMAT_VERSION, "max_len": lmatch.MAX_LEN, "build_id": bid,
        "next_dtype": lmatch.next_dtype(m.vocab_size).name, "len_dtype": "uint8", "none_id": int(m.vocab_size),
        "tie": "earliest", "sa_dtype": "uint32", "sa_block": lmatch.SA_BLOCK,
        "splits": {s: [{k2: records[(s, k)][k2] for k2 in ("file", "sa_file", "n_tokens", "sha256", "sa_sha256",
                                                             "matched", "len_sum") if k2 in records[(s, k)]}
                       for k in range(len(m.shards[s]))] for s in splits},
    }
    if m.extras.get("lmatch") != extras:
        m.extras["lmatch"] = extras
        m.save()  # last
    n = sum(r["n_tokens"] for r in records.values())
    matched = sum(r["matched"] for r in records.values())
    lsum = sum(r["len_sum"] for r in records.values())
    nbytes = sum(r.get("bytes", 0) + r.get("sa_bytes", 0) for r in records.values())
    ntrain = sum(r["n_tokens"] for (s, _), r in records.items() if s == "train")
    tbytes = sum(r.get("bytes", 0) + r.get("sa_bytes", 0) for (s, _), r in records.items() if s == "train")
    return {"root": root, "pieces_built": len(built), "pieces_skipped": len(records) - len(built),
            "built": sorted(f"{s}:{k}" for s, k in built), "tokens": n,
            "matched_fraction": matched / max(1, n), "mean_length": lsum / max(1, n),
            "mean_length_matched": lsum / max(1, matched), "seconds": time.time() - t0,
            "bytes_per_token": nbytes / max(1, n), "bytes_per_train_token": tbytes / max(1, ntrain)}

