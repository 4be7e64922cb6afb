"""Build the LMatch index of a tokenized dataset with parallel Ray tasks (one task per token range).

Matches sharing >= 1 token share their first token, so the token ids are cut into contiguous
ranges of about `task_tokens` positions each (at least one range per worker); a task
(`index.lmatch.compute_range`) runs the one-pass algorithm over the positions whose token is in
its range, across the whole split, and returns each piece's share. There is no cross-chunk
merge: the ranges' answers together are exactly one pass. Writer tasks (at most one per worker,
each a contiguous group of pieces; none when a single range covers every id: that task writes)
assemble a piece (one shard of train or val) from its shares and write, atomically,
`<shard>.lmatch` (+ `<shard>.lmsa` for train), then its completion record
`<shard>.lmatch.done.json` (build id, sha256 of the files, stats). Shards are read once in the
driver before any task starts (sha256 check + token histogram, which sizes the ranges). A rerun computes only the pieces whose record is missing, stale or whose files are
damaged (every range task is rerun for them); the manifest (`extras["lmatch"]`) is written last.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from app import storage
from app.config import ConfigError
from app.log import get_logger
from app.data.shards import ShardFormatError, load_manifest

log = get_logger(__name__)


@dataclass
class IndexConfig:
    """Build the exact-match (LMatch) index of a tokenized dataset."""

    data: str = "runs/shards"  # dataset directory (manifest.json), local or s3://
    workers: int = 0  # parallel Ray tasks (0 = one per CPU of the cluster)
    task_tokens: int = 1 << 23  # positions (train + val) per token-range task (memory ~ 100 bytes each)
    verify: bool = True  # check every shard's sha256 against the manifest before building
    splits: list[Literal["train", "val"]] = field(default_factory=lambda: ["train", "val"])  # splits to index

    def validate(self) -> None:
        if self.task_tokens < 1:
            raise ConfigError("task_tokens must be >= 1")
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


def write_piece(root: str, split: str, k: int, *parts, m=None) -> dict[str, Any]:
    """Assemble one piece (shard k of split) from its token-range parts (`compute_range`, in range
    order) and write its files, then its completion record, which it returns."""
    from index import lmatch

    m = m if m is not None else load_manifest(root)
    t0 = time.time()
    shard = m.shards[split][k]
    nxt, ln, sa = lmatch.assemble_piece(int(shard["n_tokens"]), m.vocab_size, parts)
    bid = lmatch.build_id(m)
    rec: dict[str, Any] = {"split": split, "shard": shard["file"], "shard_sha256": shard.get("sha256"),
                           "build_id": bid.hex(), "n_tokens": int(len(nxt)), "matched": int(np.count_nonzero(ln)),
                           "len_sum": int(ln.sum(dtype=np.int64))}
    data = lmatch.encode_lmatch(nxt, ln, m.vocab_size, bid)
    rec["file"] = shard["file"] + lmatch.LMATCH_SUFFIX
    storage.write_bytes(storage.join(root, rec["file"]), data)
    rec["sha256"], rec["bytes"] = _sha(data), len(data)
    if sa is not None:
        sdata = lmatch.encode_sa(sa, len(nxt), m.vocab_size, bid)
        rec["sa_file"] = shard["file"] + lmatch.SA_SUFFIX
        storage.write_bytes(storage.join(root, rec["sa_file"]), sdata)
        rec["sa_sha256"], rec["sa_bytes"] = _sha(sdata), len(sdata)
    rec["seconds"] = round(time.time() - t0, 3)
    storage.write_json(_record_path(root, shard["file"]), rec)  # last: marks the piece done
    return rec


def _range_parts(root: str, lo: int, hi: int, pieces: list[tuple[str, int]]):
    """compute_range on the dataset at `root`: one part per piece (a tuple, for num_returns)."""
    from index import lmatch

    parts = lmatch.compute_range(load_manifest(root), lo, hi, pieces)
    return parts[0] if len(parts) == 1 else tuple(parts)


def _range_write(root: str, lo: int, hi: int, pieces: list[tuple[str, int]]) -> dict:
    """One range covering every token id: compute and write every piece in one task (no parts
    to move, no writer tasks)."""
    from index import lmatch

    m = load_manifest(root)
    parts = lmatch.compute_range(m, lo, hi, pieces)
    return {sk: write_piece(root, sk[0], sk[1], pt, m=m) for sk, pt in zip(pieces, parts)}


def _write_group(root: str, pieces: list[tuple[str, int]], n_ranges: int, *parts) -> dict:
    """Write several pieces; `parts` holds each piece's n_ranges parts in turn (range order)."""
    m = load_manifest(root)
    return {sk: write_piece(root, sk[0], sk[1], *parts[i * n_ranges: (i + 1) * n_ranges], m=m)
            for i, sk in enumerate(pieces)}


def _groups(sizes: list[int], n: int) -> list[list[int]]:
    """Contiguous groups of indices, at most n, of about equal total size."""
    c = np.cumsum(sizes)
    cut = np.searchsorted(c, c[-1] * np.arange(1, n) / n, side="right")
    edges = np.unique(np.concatenate([[0], cut, [len(sizes)]]))
    return [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _check_shards(m, splits: list[str]) -> None:
    """Fail fast, with the path, on missing / truncated / wrong-dtype shards."""
    from index import lmatch

    for split in splits:
        st = lmatch.SplitStream(m, split)
        for k in range(len(st.infos)):
            st.shard(k)


def _unwrap(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _n_ranges(m, pieces: list[tuple[str, int]], cfg: IndexConfig, workers: int) -> int:
    """How many token-range tasks: about task_tokens positions each, at least one per worker."""
    n = sum(int(s["n_tokens"]) for s in m.shards["train"])
    n += sum(int(m.shards[s][k]["n_tokens"]) for s, k in pieces if s != "train")
    return max(workers, -(-n // cfg.task_tokens))


_REMOTE: dict[str, Any] = {}  # the remote functions, made once per process (not re-exported per build)


def _remote(name: str, fn, **opts):
    import ray

    if name not in _REMOTE:
        _REMOTE[name] = ray.remote(**opts)(fn)
    return _REMOTE[name]


def _build_pieces(root: str, m, pieces: list[tuple[str, int]], cfg: IndexConfig, use_ray: bool, counts):
    """Compute and write `pieces` (train and at most one query split): token-range tasks, then
    writer tasks (at most one per worker) each assembling and writing a group of pieces; a single
    range computes and writes everything in one task. `counts`: the token histogram per split."""
    from index import lmatch

    splits = list(dict.fromkeys(["train"] + [s for s, _ in pieces]))
    hist = sum(counts[s] for s in splits)
    if not use_ray:
        ranges = lmatch.token_ranges(hist, _n_ranges(m, pieces, cfg, 1))
        parts = [lmatch.compute_range(m, lo, hi, pieces) for lo, hi in ranges]
        return {sk: write_piece(root, sk[0], sk[1], *[p[i] for p in parts], m=m) for i, sk in enumerate(pieces)}
    import ray

    from app.ray_env import init_ray

    init_ray()
    workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    ranges = lmatch.token_ranges(hist, _n_ranges(m, pieces, cfg, workers))
    log.info("lmatch: %d pieces from %d token-range tasks on %d workers", len(pieces), len(ranges), workers)
    if len(ranges) == 1:
        return _get(_remote("range_write", _range_write, num_cpus=1, max_retries=2).remote(root, *ranges[0], pieces))
    task = _remote("range_parts", _range_parts, num_cpus=1, max_retries=2).options(num_returns=len(pieces))
    # writers take a whole CPU: they then run in the range tasks' (idle by then) worker processes
    writer = _remote("write_group", _write_group, num_cpus=1, max_retries=2)
    parts, pending = [], []
    try:
        for lo, hi in ranges:  # at most `workers` range tasks at a time
            if len(pending) >= workers:
                _, pending = ray.wait(pending, num_returns=1)
            refs = task.remote(root, lo, hi, pieces)
            refs = refs if isinstance(refs, list) else [refs]
            parts.append(refs)
            pending.append(refs[0])
        # writers start as soon as all ranges are done; Ray passes them the parts' values
        sizes = [int(m.shards[s][k]["n_tokens"]) for s, k in pieces]
        writes = [writer.remote(root, [pieces[i] for i in g], len(parts), *[p[i] for i in g for p in parts])
                  for g in _groups(sizes, min(workers, len(pieces)))]
        out: dict = {}
        for ref in writes:
            out.update(_get(ref))
        return out
    except BaseException:
        for refs in parts:
            ray.cancel(refs[0])
        raise


def _get(ref):
    """ray.get, re-raising a task's ShardFormatError / ValueError as itself (one clear line)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        err = _unwrap(e)
        if isinstance(err, (ShardFormatError, ValueError)):
            raise type(err)(str(err)) from None
        raise


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
    bid = lmatch.build_id(m).hex()
    todo, records = [], {}
    for split in splits:
        for k, shard in enumerate(m.shards[split]):
            rec = _piece_done(root, split, shard, bid)
            if rec is None:
                todo.append((split, k))
            else:
                records[(split, k)] = rec
    if not todo:
        _check_shards(m, splits)
    else:  # one read of every shard: checks (sha256: every range task reads every shard) + histogram
        need = list(dict.fromkeys(["train"] + [s for s, _ in todo]))
        counts = {s: lmatch.token_counts(m, [s], verify=cfg.verify) for s in need}
    log.info("lmatch %s: %d pieces to build, %d already done", root, len(todo), len(records))
    # One pass per query split (val), the train pieces riding along with the first one.
    queries = list(dict.fromkeys(s for s, _ in todo if s != "train")) or ["train"] * bool(todo)
    for i, q in enumerate(queries):
        pieces = [sk for sk in todo if sk[0] == q or (i == 0 and sk[0] == "train")]
        records.update(_build_pieces(root, m, pieces, cfg, use_ray, counts))
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
    return {"root": root, "pieces_built": len(todo), "pieces_skipped": len(records) - len(todo),
            "built": sorted(f"{s}:{k}" for s, k in todo), "tokens": n,
            "matched_fraction": matched / max(1, n), "mean_length": lsum / max(1, n),
            "mean_length_matched": lsum / max(1, matched), "seconds": time.time() - t0,
            "bytes_per_token": nbytes / max(1, n), "bytes_per_train_token": tbytes / max(1, ntrain)}

