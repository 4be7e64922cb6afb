"""FAISS kNN-LM datastore: keys = a model's final hidden states, values = the next token; train, add,
merge on disk, search, and the kNN distribution interpolated with the LM's (no Ray here).

A finished index directory holds:
  `index.faiss`    the FAISS index (IVF-PQ with its inverted lists in `index.ivfdata`, or exact `IndexFlatL2`)
  `index.ivfdata`  IVF-PQ only: the merged on-disk inverted lists (memory-mapped when searching)
  `values.npy`     int32 [n]: the token that followed key i (FAISS ids are positions 0..n-1)
  `meta.json`      format, version, n, d, kind, nlist, m, metric, ... and the builder's metadata; written last,
                   so a directory without it is an unfinished build.
Building (see `build_index`): train an empty index on a sample of keys (`trained.faiss`), add each
group of key shards to its own copy of it (`parts/part_*.faiss`, in parallel through the `map_fn`
the caller gives), then merge the parts' inverted lists into one on-disk list (`merge_ondisk`).

Distances: `KnnIndex.search` always returns "smaller = closer" (squared L2, or minus the inner product
for metric "ip"), so `knn_logprobs` is softmax(-dist / temperature) over the neighbours, summed per token.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import faiss
import numpy as np
import torch

FORMAT = "spotlm-knn"
FORMAT_VERSION = 1
META, INDEX, IVFDATA, VALUES, TRAINED, PARTS = \
    "meta.json", "index.faiss", "index.ivfdata", "values.npy", "trained.faiss", "parts"
EXACT_BELOW = 32768  # datastores with fewer keys get an exact IndexFlatL2 (IVF-PQ needs ~40 x 256 training points)
PQ_BITS = 8  # bits per PQ sub-quantizer code


class KnnFormatError(ValueError):
    """An index directory that is missing, unfinished, or not in this format."""


@contextlib.contextmanager
def _stdout_to_stderr():
    """FAISS's C++ code prints progress lines ("resizing ...", "updating ondisk filename") with printf:
    send file descriptor 1 to stderr meanwhile, so a job's stdout stays clean JSON."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to redirect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# ---------------------------------------------------------------- parameters


@dataclass
class KnnParams:
    """The index shape, chosen from n and d by `choose_params` (0 = derive it)."""

    d: int  # key width (the model's d_model)
    kind: str = "ivfpq"  # ivfpq | flat (exact)
    metric: str = "l2"  # l2 | ip
    nlist: int = 0  # IVF cells
    m: int = 0  # PQ sub-quantizers (bytes per code at 8 bits); divides d
    nbits: int = PQ_BITS


def _largest_divisor(d: int, at_most: int) -> int:
    return max(x for x in range(1, max(1, at_most) + 1) if d % x == 0)


def choose_params(n: int, d: int, *, nlist: int = 0, m: int = 0, metric: str = "l2", exact_below: int = EXACT_BELOW,
                  kind: str = "auto", nbits: int = PQ_BITS) -> KnnParams:
    """Sane defaults: nlist = a power of two near 4 sqrt(n), at most n / 39 (FAISS wants ~39 training points
    per centroid); m = the largest divisor of d up to min(64, d / 2) (sub-vectors of >= 2 dims, codes of
    <= 64 bytes). Fewer than `exact_below` keys (or kind="flat") gives the exact flat index instead."""
    if metric not in ("l2", "ip"):
        raise ValueError(f"metric must be l2 or ip, got {metric!r}")
    if kind not in ("auto", "flat", "ivfpq"):
        raise ValueError(f"kind must be auto, flat or ivfpq, got {kind!r}")
    if n < 1 or d < 1:
        raise ValueError(f"an index needs n >= 1 keys of d >= 1 dims (got n={n}, d={d})")
    if kind == "flat" or (kind == "auto" and n < exact_below):
        return KnnParams(d=d, kind="flat", metric=metric)
    if not nlist:
        nlist = 2 ** int(math.log2(4 * math.sqrt(n)))
        nlist = max(1, min(nlist, 2 ** int(math.log2(max(1, n // 39))), 65536))
    m = m or _largest_divisor(d, min(64, d // 2))
    if d % m:
        raise ValueError(f"PQ m={m} must divide d={d}")
    if n < nlist:
        raise ValueError(f"nlist={nlist} is more than the {n} keys")
    if not 1 <= nbits <= 16:
        raise ValueError(f"PQ nbits must be in [1, 16], got {nbits}")
    return KnnParams(d=d, kind="ivfpq", metric=metric, nlist=nlist, m=m, nbits=nbits)


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def empty_index(p: KnnParams) -> faiss.Index:
    """An untrained index of shape `p` (IVF-PQ with a flat quantizer of the same metric, or flat)."""
    if p.kind == "flat":
        return faiss.IndexFlatL2(p.d) if p.metric == "l2" else faiss.IndexFlatIP(p.d)
    quantizer = faiss.IndexFlatL2(p.d) if p.metric == "l2" else faiss.IndexFlatIP(p.d)
    index = faiss.IndexIVFPQ(quantizer, p.d, p.nlist, p.m, p.nbits, _faiss_metric(p.metric))
    index.own_fields = True  # the index owns (and frees) its quantizer
    quantizer.this.disown()
    return index


def train_index(sample: np.ndarray, p: KnnParams, seed: int = 0) -> faiss.Index:
    """An empty index trained on `sample` [s, d] float32 (flat: nothing to train)."""
    index = empty_index(p)
    if p.kind == "ivfpq":
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        index.pq.cp.seed = seed
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def train_sample_size(p: KnnParams, n: int, requested: int = 0) -> int:
    """How many keys to train on: `requested`, else enough for the coarse and PQ k-means (64 per centroid)."""
    if p.kind == "flat":
        return 0
    want = requested or max(64 * p.nlist, 64 * 2 ** p.nbits, 20000)  # FAISS warns below 39 per centroid
    return min(n, want)


# ---------------------------------------------------------------- key shards


def _atomic_save(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def key_shard_paths(shard_dir: str, i: int) -> tuple[str, str]:
    """(keys .npy, values .npy) of key shard `i`."""
    return os.path.join(shard_dir, f"keys_{i:05d}.npy"), os.path.join(shard_dir, f"values_{i:05d}.npy")


def write_key_shard(shard_dir: str, i: int, keys: np.ndarray, values: np.ndarray) -> None:
    """Write shard `i` (keys float32 [n, d], values int32 [n]) atomically; the values file last marks it done."""
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} keys but {len(values)} values")
    os.makedirs(shard_dir, exist_ok=True)
    kp, vp = key_shard_paths(shard_dir, i)
    _atomic_save(kp, np.ascontiguousarray(keys, dtype=np.float32))
    _atomic_save(vp, np.ascontiguousarray(values, dtype=np.int32))


def key_shard_done(shard_dir: str, i: int) -> bool:
    return all(os.path.exists(p) for p in key_shard_paths(shard_dir, i))


def read_key_shard(shard_dir: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard `i` memory-mapped: keys [n, d] float32, values [n] int32."""
    kp, vp = key_shard_paths(shard_dir, i)
    return np.load(kp, mmap_mode="r"), np.load(vp, mmap_mode="r")


def _shard_rows(shard_dir: str, n_shards: int) -> list[int]:
    return [int(np.load(key_shard_paths(shard_dir, i)[1], mmap_mode="r").shape[0]) for i in range(n_shards)]


def sample_keys(shard_dir: str, n_shards: int, size: int, seed: int = 0) -> np.ndarray:
    """`size` keys drawn uniformly without replacement over all shards (float32 [size, d])."""
    rows = _shard_rows(shard_dir, n_shards)
    starts = np.cumsum([0] + rows)
    pick = np.sort(np.random.default_rng(seed).choice(starts[-1], size=min(size, starts[-1]), replace=False))
    out = []
    for i in range(n_shards):
        sel = pick[(pick >= starts[i]) & (pick < starts[i + 1])] - starts[i]
        if len(sel):
            out.append(np.asarray(read_key_shard(shard_dir, i)[0][sel], dtype=np.float32))
    return np.concatenate(out)


# ---------------------------------------------------------------- build


def add_part(trained_path: str, shard_dir: str, shards: Sequence[int], first_id: int, out_path: str,
             threads: int = 0) -> str:
    """One parallel unit: the trained empty index plus the keys of `shards` (ids from `first_id` on),
    written atomically to `out_path`. Skips work already on disk. Returns `out_path`."""
    if os.path.exists(out_path):
        return out_path
    if threads:
        faiss.omp_set_num_threads(threads)
    index = faiss.read_index(trained_path)
    next_id = first_id
    for i in shards:
        keys, _ = read_key_shard(shard_dir, i)
        for s in range(0, len(keys), 65536):  # bounded memory for big shards
            block = np.ascontiguousarray(keys[s:s + 65536], dtype=np.float32)
            if isinstance(index, faiss.IndexFlat):  # flat ids are positions: parts are concatenated in order
                index.add(block)
            else:
                index.add_with_ids(block, np.arange(next_id, next_id + len(block), dtype=np.int64))
            next_id += len(block)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    faiss.write_index(index, tmp)
    os.replace(tmp, out_path)
    return out_path


def _write_values(shard_dir: str, n_shards: int, n: int, out_path: str) -> None:
    tmp = f"{out_path}.tmp-{os.getpid()}.npy"
    values = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n,))
    pos = 0
    for i in range(n_shards):
        v = read_key_shard(shard_dir, i)[1]
        values[pos:pos + len(v)] = v
        pos += len(v)
    values.flush()
    del values
    os.replace(tmp, out_path)


def build_index(shard_dir: str, n_shards: int, out_dir: str, *, params: KnnParams | None = None,
                nlist: int = 0, m: int = 0, nbits: int = PQ_BITS, metric: str = "l2", kind: str = "auto",
                exact_below: int = EXACT_BELOW, train_sample: int = 0, n_parts: int = 0, seed: int = 0,
                map_fn: Callable[..., Iterable[str]] | None = None, extra_meta: dict[str, Any] | None = None,
                threads: int = 0, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Build `out_dir` from finished key shards `0..n_shards-1` of `shard_dir`; returns the meta.

    Resumable: the trained index, each part and the values are reused when present; meta.json is written
    last. `map_fn(fn, *iterables)` runs `add_part` over the parts (the built-in `map` by default; the Ray
    orchestration passes one that runs them as tasks). `n_parts` = how many parts (0 = one per shard, at
    most 16). Tiny datastores (fewer than `exact_below` keys) get an exact flat index, said in the meta.
    `threads` > 0 sets FAISS's OpenMP threads in this process (its spinning threads slow down badly on CPUs
    shared with other work: give what the process really has)."""
    meta_path = os.path.join(out_dir, META)
    if os.path.exists(meta_path):
        return read_meta(out_dir)
    missing = [i for i in range(n_shards) if not key_shard_done(shard_dir, i)]
    if missing:
        raise ValueError(f"{shard_dir}: key shards {missing[:5]} are not written yet")
    if threads:
        faiss.omp_set_num_threads(threads)
    rows = _shard_rows(shard_dir, n_shards)
    n = int(sum(rows))
    d = int(read_key_shard(shard_dir, 0)[0].shape[1])
    p = params or choose_params(n, d, nlist=nlist, m=m, nbits=nbits, metric=metric, exact_below=exact_below, kind=kind)
    os.makedirs(out_dir, exist_ok=True)
    if p.kind == "flat":
        log(f"{n} keys (< {exact_below}): exact IndexFlat{p.metric.upper()} instead of IVF-PQ")
    else:
        log(f"{n} keys of {d} dims: IVF{p.nlist},PQ{p.m}x{p.nbits} ({p.metric})")

    # ---- train the empty index on a sample ----
    trained_path = os.path.join(out_dir, TRAINED)
    ns = train_sample_size(p, n, train_sample)
    if not os.path.exists(trained_path):
        sample = sample_keys(shard_dir, n_shards, ns, seed) if ns else np.zeros((0, d), np.float32)
        index = train_index(sample, p, seed)
        faiss.write_index(index, trained_path + ".tmp")
        os.replace(trained_path + ".tmp", trained_path)

    # ---- add key shards to copies of it, in parallel parts ----
    n_parts = max(1, min(n_parts or min(n_shards, 16), n_shards))
    groups = [list(g) for g in np.array_split(np.arange(n_shards), n_parts) if len(g)]
    first_ids = [int(sum(rows[:g[0]])) for g in groups]
    part_dir = os.path.join(out_dir, PARTS)
    os.makedirs(part_dir, exist_ok=True)
    part_paths = [os.path.join(part_dir, f"part_{j:05d}.faiss") for j in range(len(groups))]
    list((map_fn or map)(add_part, [trained_path] * len(groups), [shard_dir] * len(groups), groups, first_ids,
                         part_paths))

    # ---- merge the parts: on-disk inverted lists (IVF), or one flat index ----
    index_path = os.path.join(out_dir, INDEX)
    if p.kind == "flat":
        index = faiss.read_index(trained_path)
        for pp in part_paths:
            part = faiss.read_index(pp)
            index.add(part.reconstruct_n(0, part.ntotal))  # parts hold consecutive ids in order
    else:
        from faiss.contrib.ondisk import merge_ondisk

        index = faiss.read_index(trained_path)
        ivfdata = os.path.join(out_dir, IVFDATA)
        if os.path.exists(ivfdata):
            os.remove(ivfdata)  # a merge that stopped half way
        with _stdout_to_stderr():
            merge_ondisk(index, part_paths, ivfdata)
    if index.ntotal != n:
        raise RuntimeError(f"merged index holds {index.ntotal} keys, expected {n}")
    faiss.write_index(index, index_path + ".tmp")
    os.replace(index_path + ".tmp", index_path)
    del index
    _write_values(shard_dir, n_shards, n, os.path.join(out_dir, VALUES))

    # ---- meta last ----
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **asdict(p), "n": n, "train_sample": ns,
            "parts": len(part_paths), "exact": p.kind == "flat", **(extra_meta or {})}
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, meta_path)
    shutil.rmtree(part_dir, ignore_errors=True)
    return meta


def read_meta(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise KnnFormatError(f"{path}: no {META}: not a kNN index (or its build did not finish)") from None
    if meta.get("format") != FORMAT:
        raise KnnFormatError(f"{path}: not a spotlm kNN index")
    if meta.get("version") != FORMAT_VERSION:
        raise KnnFormatError(f"{path}: kNN index version {meta.get('version')}, this code reads {FORMAT_VERSION}")
    return meta


# ---------------------------------------------------------------- search


class KnnIndex:
    """A finished index opened for search: `search(hidden [B, d], k) -> (dist [B, k], next_ids [B, k])`."""

    def __init__(self, path: str, index: faiss.Index, values: np.ndarray, meta: dict[str, Any]):
        self.path, self.index, self.values, self.meta = path, index, values, meta
        self.d, self.n, self.metric = int(meta["d"]), int(meta["n"]), meta["metric"]

    @classmethod
    def open(cls, path: str, nprobe: int = 32, threads: int = 0) -> KnnIndex:
        meta = read_meta(path)
        if threads:
            faiss.omp_set_num_threads(threads)
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if meta["kind"] == "ivfpq" else 0  # find index.ivfdata beside it
        with _stdout_to_stderr():
            index = faiss.read_index(os.path.join(path, INDEX), flags)
        values = np.load(os.path.join(path, VALUES), mmap_mode="r")
        if index.ntotal != meta["n"] or len(values) != meta["n"] or index.d != meta["d"]:
            raise KnnFormatError(f"{path}: index holds {index.ntotal} keys / {len(values)} values, meta says {meta['n']}")
        out = cls(path, index, values, meta)
        out.nprobe = nprobe
        return out

    @property
    def nprobe(self) -> int:
        return faiss.extract_index_ivf(self.index).nprobe if self.meta["kind"] == "ivfpq" else 0

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.meta["kind"] == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = max(1, int(value))

    def search(self, hidden: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest `k` keys of each row: distances (float32, smaller = closer; +inf where fewer than k were
        found) and their next tokens (int64; -1 where none)."""
        if isinstance(hidden, torch.Tensor):
            hidden = hidden.detach().float().cpu().numpy()
        q = np.ascontiguousarray(hidden, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ValueError(f"queries must be [B, {self.d}], got {q.shape}")
        dist, ids = self.index.search(q, k)
        if self.metric == "ip":
            dist = -dist
        missing = ids < 0
        next_ids = np.where(missing, -1, np.asarray(self.values)[np.where(missing, 0, ids)]).astype(np.int64)
        dist = np.where(missing, np.inf, dist).astype(np.float32)
        return dist, next_ids


# ---------------------------------------------------------------- kNN distribution and interpolation


def _neighbour_logweights(dist, temperature: float) -> torch.Tensor:
    """log softmax(-dist / T) over the neighbours; -inf for missing ones (rows with none stay all -inf)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    d = torch.as_tensor(dist, dtype=torch.float32)
    scores = -d / temperature  # +inf distances -> -inf scores
    top = scores.max(dim=-1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    lse = torch.logsumexp(scores - top, dim=-1, keepdim=True) + top
    return scores - lse


def knn_logprobs(dist, next_ids, vocab: int, temperature: float = 1.0) -> torch.Tensor:
    """log p_kNN [B, vocab]: softmax(-dist / T) over the k neighbours, summed over neighbours with the same
    next token. Rows without any neighbour are all -inf (`interpolate` then keeps the LM)."""
    w = _neighbour_logweights(dist, temperature).exp()  # [B, k]
    ids = torch.as_tensor(next_ids, dtype=torch.int64)
    valid = ids >= 0
    p = torch.zeros(w.shape[0], vocab, dtype=torch.float32)
    p.scatter_add_(1, torch.where(valid, ids, 0), torch.where(valid, w, torch.zeros_like(w)))
    return p.log()


def knn_target_logprob(dist, next_ids, targets, temperature: float = 1.0) -> torch.Tensor:
    """log p_kNN(target) [B] without the [B, vocab] matrix: log of the summed weights of the neighbours
    whose next token is the target (-inf when none is)."""
    lw = _neighbour_logweights(dist, temperature)
    hit = torch.as_tensor(next_ids, dtype=torch.int64) == torch.as_tensor(targets, dtype=torch.int64)[:, None]
    return torch.logsumexp(torch.where(hit, lw, torch.full_like(lw, -math.inf)), dim=-1)


def interpolate(lm_logprobs: torch.Tensor, knn_logprobs: torch.Tensor, lam: float) -> torch.Tensor:
    """log(lam p_kNN + (1 - lam) p_LM), elementwise via logsumexp (any shape). Rows (last dim) where the
    kNN side is all -inf (no neighbour) keep the LM's log-probabilities."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    lm = torch.as_tensor(lm_logprobs, dtype=torch.float32)
    kn = torch.as_tensor(knn_logprobs, dtype=torch.float32)
    if lam == 0.0:
        return lm.clone()
    if lam == 1.0:
        out = kn.clone()
    else:
        out = torch.logaddexp(kn + math.log(lam), lm + math.log1p(-lam))
    if kn.dim() >= 2:
        none = torch.isneginf(kn).all(dim=-1, keepdim=True)
        return torch.where(none, lm, out)
    return out
