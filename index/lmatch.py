"""LMatch: a TScale-style exact longest-match index over a tokenized dataset (pure numpy, no Ray).

Definition (what every function here computes; `MAX_LEN` = 32)
----------------------------------------------------------------
A split's token stream is the concatenation of its shards in manifest order. Every document ends
with one end-of-text token (`eot`), which belongs to the document it ends. For a position p let
s(p) be the first position of p's document. The *context key* of p is the reversed window

    key(p) = (tokens[p], tokens[p-1], ..., tokens[p-k+1]),   k = min(MAX_LEN, p - s(p) + 1),

and key(p) is empty when tokens[p] is the EOT. For a position i the match length is

    L(i) = max over candidates j of LCP(key(i), key(j))            (0 when there is none)

i.e. the longest L <= min(32, i - s(i) + 1) such that tokens[j-L+1 .. j] == tokens[i-L+1 .. i]
with the window [j-L+1, j] inside one document and j not the last token (EOT) of its document,
so that its follower tokens[j+1] is in the same document. Candidates j are: for the train split
the train positions j < i (train text only matches text before it); for the val split, and for
new text at serving time, every position of the TRAIN split (except a final unterminated one).

Tie rule: among the candidates reaching L(i), the EARLIEST one (smallest j in stream order, i.e.
the first occurrence of the matched n-gram). It is the natural rule for the suffix-sorted
layout (a range-minimum over the sorted positions of the group sharing the L-gram), it makes
"j < i" free (the group's first occurrence is < i exactly when any member is), and it makes the
result independent of how the corpus is chunked: chunked results merge by (longer L, then
smaller j).

Recorded per position: next(i) = tokens[j+1] for the chosen j, or NONE = vocab_size when
L(i) = 0; and L(i) as uint8. Next ids are uint16 when vocab_size + 1 <= 65535, else uint32.

Algorithm (per batch of positions, all numpy)
---------------------------------------------
1. Keys are packed into W uint64 words (4 lanes of 16 bits, or 2 of 32 bits for large vocabs;
   lane = token + 1, 0 = past the document start), so lexicographic order of the word rows is the
   order of the reversed contexts (a shorter context sorts before any it prefixes).
2. Sort: a stable argsort on word 0, then only the runs of equal words are refined by the next
   word (lexsort on (run id, word)), so ties keep position order: (key, position) order.
3. Adjacent LCPs from XOR of neighbouring rows (first non-zero word, then lane), capped by the
   key lengths.
4. Level loop L = 1..32 over the entries still in a group of size >= 2: group minimum of the
   candidate positions (`np.minimum.reduceat`); an entry whose group minimum is below its own
   query threshold has L(i) >= L and j = that minimum. Groups shrink fast, so this is cheap.
Cross-chunk: a query chunk is processed jointly with each earlier chunk (the same four steps on
the union); the per-pair answers merge by (longer, then earlier). The result is bitwise equal
to one pass over the whole split (tested).

Files, beside each shard `<shard>` (1 KiB header of 256 little-endian uint32, like shards):
- `<shard>.lmatch`: header [magic 'LMAT', version, next-id bytes (2|4), n_tokens, max_len,
  vocab_size, 0, 0, build id (8 words)], then next ids (n x 2|4 bytes), then lengths (n x 1 byte).
- `<shard>.lmsa` (train only): header [magic 'LMSA', version, 4, n_tokens, max_len, vocab_size,
  n_entries, block, build id], then the shard's sorted positions (uint32, local to the shard;
  EOT positions and a final unterminated position left out), then the minimum of every block of
  `SA_BLOCK` sorted positions (uint32) for range-minimum queries. ~4.02 bytes per token.
Total on disk per indexed train token: 2 + 1 + 4 (+0.016) bytes for uint16 vocabularies.
"""
from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from app import storage
from app.shards import HEADER_BYTES, HEADER_INTS, ShardFormatError, load_manifest, read_header, read_shard

MAX_LEN = 32
FORMAT_VERSION = 1
MAGIC_LMATCH = 0x54414D4C  # "LMAT"
MAGIC_SA = 0x41534D4C  # "LMSA"
SA_BLOCK = 256
LMATCH_SUFFIX = ".lmatch"
SA_SUFFIX = ".lmsa"
EXTRAS_KEY = "lmatch"
_INF = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------- dtypes and keys

def next_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every next id (vocab ids and NONE = vocab_size) fits, else uint32."""
    return np.dtype("<u2") if vocab_size + 1 <= 65535 else np.dtype("<u4")


def lane_bits(vocab_size: int) -> int:
    """Bits per token lane of a packed key: token + 1 must fit (0 marks 'before the document')."""
    return 16 if vocab_size <= 65535 else 32


def doc_starts(ext: np.ndarray, eot: int) -> np.ndarray:
    """For each index p of `ext`, the index where p's document starts (0 at the window start)."""
    idx = np.arange(1, len(ext) + 1, dtype=np.int64)
    return np.maximum.accumulate(np.where(ext == eot, idx, 0))


def key_lengths(ext: np.ndarray, p: np.ndarray, starts: np.ndarray, eot: int, max_len: int = MAX_LEN) -> np.ndarray:
    kl = np.minimum(p - starts[p] + 1, max_len)
    kl[ext[p] == eot] = 0
    return kl.astype(np.int64)


def pack_keys(ext: np.ndarray, p: np.ndarray, kl: np.ndarray, bits: int, max_len: int = MAX_LEN) -> np.ndarray:
    """Rows of W uint64 words holding the reversed contexts of positions `p` of `ext`."""
    per = 64 // bits
    words = -(-max_len // per)
    K = np.zeros((len(p), words), dtype=np.uint64)
    e64 = ext.astype(np.uint64, copy=False)
    for t in range(max_len):
        v = e64[np.maximum(p - t, 0)] + np.uint64(1)
        v[kl <= t] = 0
        K[:, t // per] |= v << np.uint64(bits * (per - 1 - t % per))
    return K


def sort_keys(K: np.ndarray) -> np.ndarray:
    """Order of the rows of K, lexicographic, ties in input order (stable)."""
    m, W = K.shape
    order = np.argsort(K[:, 0], kind="stable")
    if m < 2:
        return order
    brk = np.zeros(m, dtype=bool)
    brk[0] = True
    for w in range(1, W):
        prev = K[order, w - 1]
        brk[1:] |= prev[1:] != prev[:-1]
        single = brk & np.append(brk[1:], True)
        sub = np.flatnonzero(~single)
        if sub.size == 0:
            break
        run = np.cumsum(brk)[sub]
        osub = order[sub]
        perm = np.lexsort((K[osub, w], run))
        order[sub] = osub[perm]
    return order


def adjacent_lcp(Ks: np.ndarray, kls: np.ndarray, bits: int) -> np.ndarray:
    """LCP (in tokens) of each sorted row with the previous one; element 0 is 0."""
    m, W = Ks.shape
    out = np.zeros(m, dtype=np.int64)
    if m < 2:
        return out
    per = 64 // bits
    X = Ks[1:] ^ Ks[:-1]
    nz = X != 0
    w = np.argmax(nz, axis=1)
    x = X[np.arange(m - 1), w]
    lane = np.zeros(m - 1, dtype=np.int64)
    for u in range(1, per):  # lane index of the highest non-zero lane (later u = stronger condition)
        lane[(x >> np.uint64(bits * (per - u))) == 0] = u
    lcp = w * per + lane
    lcp[~nz.any(axis=1)] = W * per
    out[1:] = np.minimum(lcp, np.minimum(kls[1:], kls[:-1]))
    return out


def best_earlier(lcp_left: np.ndarray, cand: np.ndarray, qpos: np.ndarray, max_len: int = MAX_LEN):
    """Level loop over sorted entries: (L, j) per entry; j = min candidate of the deepest group
    (sharing >= L tokens) whose minimum is below the entry's threshold `qpos`."""
    m = len(lcp_left)
    L = np.zeros(m, dtype=np.uint8)
    J = np.full(m, -1, dtype=np.int64)
    if m < 2:
        return L, J
    lcp_right = np.append(lcp_left[1:], 0)
    reach = np.maximum(lcp_left, lcp_right)
    idx = np.flatnonzero(reach >= 1)
    for lv in range(1, max_len + 1):
        idx = idx[reach[idx] >= lv]
        if idx.size == 0:
            break
        st = np.flatnonzero(lcp_left[idx] < lv)
        gmin = np.minimum.reduceat(cand[idx], st)
        g = np.repeat(gmin, np.diff(np.append(st, idx.size)))
        hit = g < qpos[idx]
        h = idx[hit]
        L[h] = lv
        J[h] = g[hit]
    return L, J


@dataclass
class Part:
    """A run of the stream given to `match_parts`: `ext[h:h+m]` are positions base..base+m-1;
    `ext[:h]` is history (up to 31 tokens before), `ext[h+m]` (if present) the next token.

    cand: its positions are candidates j (those >= cand_limit are not);
    query: None (no answers), "before" (train: j < i), "any" (val/serving: any candidate)."""

    ext: np.ndarray
    h: int
    m: int
    base: int
    cand: bool
    query: str | None
    cand_limit: int = _INF


def match_parts(parts: list[Part], eot: int, vocab_size: int, max_len: int = MAX_LEN):
    """Joint longest-earliest match over the union of `parts`.

    Returns, for every part with a query mode, (next ids, lengths, j) arrays of its m positions
    (j = global chosen position or -1); None for the others."""
    bits = lane_bits(vocab_size)
    Ks, kls, cands, qs, owners, locs = [], [], [], [], [], []
    for k, pt in enumerate(parts):
        ext = np.asarray(pt.ext)
        starts = doc_starts(ext, eot)
        p = np.arange(pt.h, pt.h + pt.m, dtype=np.int64)
        kl = key_lengths(ext, p, starts, eot, max_len)
        keep = kl > 0
        p, kl = p[keep], kl[keep]
        gpos = p - pt.h + pt.base
        Ks.append(pack_keys(ext, p, kl, bits, max_len))
        kls.append(kl)
        c = np.where(gpos < pt.cand_limit, gpos, _INF) if pt.cand else np.full(len(p), _INF, np.int64)
        cands.append(c)
        q = {None: np.full(len(p), -1, np.int64), "before": gpos, "any": np.full(len(p), _INF, np.int64)}[pt.query]
        qs.append(q)
        owners.append(np.full(len(p), k, np.int64))
        locs.append(p - pt.h)
    K = np.concatenate(Ks)
    order = sort_keys(K)
    kl_s = np.concatenate(kls)[order]
    lcp = adjacent_lcp(K[order], kl_s, bits)
    del K
    Ls, Js = best_earlier(lcp, np.concatenate(cands)[order], np.concatenate(qs)[order], max_len)
    owner = np.concatenate(owners)[order]
    loc = np.concatenate(locs)[order]
    # Followers of the chosen j: find the part holding j (global ranges of candidate parts).
    nxt_all = np.full(len(order), vocab_size, dtype=np.int64)
    hit = Js >= 0
    for pt in parts:
        if not pt.cand:
            continue
        sel = hit & (Js >= pt.base) & (Js < pt.base + pt.m)
        nxt_all[sel] = np.asarray(pt.ext)[pt.h + (Js[sel] - pt.base) + 1]
    out = []
    nd = next_dtype(vocab_size)
    for k, pt in enumerate(parts):
        if pt.query is None:
            out.append(None)
            continue
        sel = owner == k
        nxt = np.full(pt.m, vocab_size, dtype=nd)
        ln = np.zeros(pt.m, dtype=np.uint8)
        jj = np.full(pt.m, -1, dtype=np.int64)
        nxt[loc[sel]] = nxt_all[sel]
        ln[loc[sel]] = Ls[sel]
        jj[loc[sel]] = Js[sel]
        out.append((nxt, ln, jj))
    return out


def merge_results(a, b):
    """Merge two (next, len, j) answers for the same positions: longer wins, then earlier j."""
    na, la, ja = a
    nb, lb, jb = b
    take = (lb > la) | ((lb == la) & (lb > 0) & (jb < ja))
    return np.where(take, nb, na), np.where(take, lb, la), np.where(take, jb, ja)


def lmatch_stream(tokens: np.ndarray, eot: int, vocab_size: int, max_len: int = MAX_LEN):
    """One pass over a whole (train) stream: (next ids, lengths, j). The single-process baseline."""
    tokens = np.asarray(tokens, dtype=np.int64)
    (res,) = match_parts([Part(tokens, 0, len(tokens), 0, True, "before")], eot, vocab_size, max_len)
    return res


def lmatch_against(train: np.ndarray, query: np.ndarray, eot: int, vocab_size: int, max_len: int = MAX_LEN):
    """One pass of a (val) stream against a whole train stream: (next ids, lengths, j into train)."""
    train = np.asarray(train, dtype=np.int64)
    query = np.asarray(query, dtype=np.int64)
    _, res = match_parts([Part(train, 0, len(train), 0, True, None, cand_limit=len(train) - 1),
                          Part(query, 0, len(query), 0, False, "any")], eot, vocab_size, max_len)
    return res


# ----------------------------------------------------------------------------- stream of a split

class SplitStream:
    """Random access to a split's token stream across its shards (memory-mapped)."""

    def __init__(self, manifest, split: str):
        self.manifest = manifest
        self.split = split
        self.paths = manifest.shard_paths(split)
        self.infos = manifest.shards.get(split, [])
        sizes = [int(s["n_tokens"]) for s in self.infos]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self._arrays: dict[int, np.ndarray] = {}

    def shard(self, k: int, verify: bool = False) -> np.ndarray:
        if k not in self._arrays or verify:
            arr = read_shard(self.paths[k], verify_sha256=self.infos[k].get("sha256") if verify else None)
            want = np.dtype(self.manifest.dtype)
            if arr.dtype.itemsize != want.itemsize:
                raise ShardFormatError(f"{self.paths[k]}: {arr.dtype.itemsize}-byte tokens, manifest says "
                                       f"{self.manifest.dtype}")
            if len(arr) != int(self.infos[k]["n_tokens"]):
                raise ShardFormatError(f"{self.paths[k]}: {len(arr)} tokens, manifest says "
                                       f"{self.infos[k]['n_tokens']} (truncated or replaced)")
            self._arrays[k] = arr
        return self._arrays[k]

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens of global positions [a, b) clipped to the stream, as int64."""
        a, b = max(0, a), min(self.n, b)
        if b <= a:
            return np.zeros(0, dtype=np.int64)
        k0 = int(np.searchsorted(self.offsets, a, side="right") - 1)
        out = []
        k = k0
        while a < b:
            lo, hi = self.offsets[k], self.offsets[k + 1]
            take = min(b, hi)
            if take > a:
                out.append(np.asarray(self.shard(k)[a - lo: take - lo], dtype=np.int64))
            a = max(a, take)
            k += 1
        return np.concatenate(out) if len(out) > 1 else out[0]

    def part(self, a: int, b: int, cand: bool, query: str | None, cand_limit: int = _INF,
             max_len: int = MAX_LEN) -> Part:
        h = min(max_len - 1, a)
        ext = self.read(a - h, b + 1)
        return Part(ext, h, b - a, a, cand, query, cand_limit)


def chunk_ranges(stream: SplitStream, chunk_tokens: int) -> list[tuple[int, int, int]]:
    """(shard index, global start, global end) of every chunk: shards cut into <= chunk_tokens."""
    out = []
    for k in range(len(stream.infos)):
        a, b = int(stream.offsets[k]), int(stream.offsets[k + 1])
        for s in range(a, b, max(1, chunk_tokens)):
            out.append((k, s, min(b, s + chunk_tokens)))
    return out


def compute_shard(manifest, split: str, k: int, chunk_tokens: int, verify: bool = True,
                  max_len: int = MAX_LEN):
    """The lmatch arrays (next ids, lengths) of shard k of `split`, and its sorted positions
    (train only, else None). Pure numpy; the Ray layer calls this once per piece."""
    train = SplitStream(manifest, "train")
    own = train if split == "train" else SplitStream(manifest, split)
    if verify:
        own.shard(k, verify=True)
    eot, vocab = int(manifest.eot_id), int(manifest.vocab_size)
    a0, b0 = int(own.offsets[k]), int(own.offsets[k + 1])
    nd = next_dtype(vocab)
    nxt = np.full(b0 - a0, vocab, dtype=nd)
    ln = np.zeros(b0 - a0, dtype=np.uint8)
    train_chunks = chunk_ranges(train, chunk_tokens)
    for s in range(a0, b0, max(1, chunk_tokens)):
        e = min(b0, s + chunk_tokens)
        res = None
        if split == "train":
            q = train.part(s, e, True, "before", max_len=max_len)
            earlier = [(ds, de) for _, ds, de in train_chunks if de <= s]
            if not earlier:
                (res,) = match_parts([q], eot, vocab, max_len)
            for ds, de in earlier:
                d = train.part(ds, de, True, None, max_len=max_len)
                _, r = match_parts([d, q], eot, vocab, max_len)
                res = r if res is None else merge_results(res, r)
        else:
            q = own.part(s, e, False, "any", max_len=max_len)
            for _, ds, de in train_chunks:
                d = train.part(ds, de, True, None, cand_limit=train.n - 1, max_len=max_len)
                _, r = match_parts([d, q], eot, vocab, max_len)
                res = r if res is None else merge_results(res, r)
        if res is not None:
            nxt[s - a0: e - a0], ln[s - a0: e - a0] = res[0], res[1]
    sa = None
    if split == "train":
        sa = shard_suffix_order(train, k, eot, vocab, max_len)
    return nxt, ln, sa


def shard_suffix_order(train: SplitStream, k: int, eot: int, vocab: int, max_len: int = MAX_LEN) -> np.ndarray:
    """Local positions of shard k sorted by (reversed context, position); EOT positions and a
    final unterminated stream position are left out (they are never candidates)."""
    a, b = int(train.offsets[k]), int(train.offsets[k + 1])
    h = min(max_len - 1, a)
    ext = train.read(a - h, b)
    starts = doc_starts(ext, eot)
    p = np.arange(h, h + b - a, dtype=np.int64)
    kl = key_lengths(ext, p, starts, eot, max_len)
    keep = kl > 0
    if b == train.n and b > a:
        keep[-1] = False
    p, kl = p[keep], kl[keep]
    order = sort_keys(pack_keys(ext, p, kl, lane_bits(vocab), max_len))
    return (p[order] - h).astype(np.uint32)


# ----------------------------------------------------------------------------- file formats

def build_id(manifest, max_len: int = MAX_LEN) -> bytes:
    """32 bytes identifying what a piece was built from (train shards, eot, vocab, format)."""
    h = hashlib.sha256()
    h.update(f"lmatch v{FORMAT_VERSION} max_len={max_len} eot={manifest.eot_id} vocab={manifest.vocab_size} "
             f"dtype={manifest.dtype}\n".encode())
    for s in manifest.shards.get("train", []):
        h.update(f"{s['file']} {s['n_tokens']} {s.get('sha256', '')}\n".encode())
    return h.digest()


def _header(magic: int, itemsize: int, n: int, max_len: int, vocab: int, entries: int, block: int,
            bid: bytes) -> np.ndarray:
    hd = np.zeros(HEADER_INTS, dtype="<u4")
    hd[:8] = [magic, FORMAT_VERSION, itemsize, n, max_len, vocab, entries, block]
    hd[8:16] = np.frombuffer(bid[:32], dtype="<u4")
    return hd


def encode_lmatch(next_ids: np.ndarray, lengths: np.ndarray, vocab_size: int, bid: bytes,
                  max_len: int = MAX_LEN) -> bytes:
    nd = next_dtype(vocab_size)
    hd = _header(MAGIC_LMATCH, nd.itemsize, len(next_ids), max_len, vocab_size, 0, 0, bid)
    return hd.tobytes() + np.asarray(next_ids, dtype=nd).tobytes() + np.asarray(lengths, dtype=np.uint8).tobytes()


def encode_sa(sa: np.ndarray, n_tokens: int, vocab_size: int, bid: bytes, max_len: int = MAX_LEN) -> bytes:
    sa = np.asarray(sa, dtype="<u4")
    mins = (np.minimum.reduceat(sa, np.arange(0, len(sa), SA_BLOCK)) if len(sa) else np.zeros(0, "<u4"))
    hd = _header(MAGIC_SA, 4, n_tokens, max_len, vocab_size, len(sa), SA_BLOCK, bid)
    return hd.tobytes() + sa.tobytes() + mins.astype("<u4").tobytes()


def read_lmatch_header(path: str) -> dict[str, Any]:
    hd, local = read_header(path, MAGIC_LMATCH, FORMAT_VERSION, "lmatch")
    item, n = int(hd[2]), int(hd[3])
    if item not in (2, 4):
        raise ShardFormatError(f"{path}: unsupported next-id size {item}")
    want = HEADER_BYTES + n * (item + 1)
    if os.path.getsize(local) != want:
        raise ShardFormatError(f"{path}: {os.path.getsize(local)} bytes on disk, header promises {want} (truncated)")
    return {"itemsize": item, "n_tokens": n, "max_len": int(hd[4]), "vocab_size": int(hd[5]),
            "build_id": hd[8:16].tobytes(), "local": local}


def read_lmatch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(next ids, lengths) of a shard's `.lmatch` file, memory-mapped read-only."""
    h = read_lmatch_header(path)
    n, item = h["n_tokens"], h["itemsize"]
    dt = np.dtype("<u2") if item == 2 else np.dtype("<u4")
    if n == 0:
        return np.zeros(0, dt), np.zeros(0, np.uint8)
    nxt = np.memmap(h["local"], dtype=dt, mode="r", offset=HEADER_BYTES, shape=(n,))
    ln = np.memmap(h["local"], dtype=np.uint8, mode="r", offset=HEADER_BYTES + n * item, shape=(n,))
    return nxt, ln


def read_sa_header(path: str) -> dict[str, Any]:
    hd, local = read_header(path, MAGIC_SA, FORMAT_VERSION, "lmatch suffix-order")
    n, entries, block = int(hd[3]), int(hd[6]), int(hd[7])
    nb = -(-entries // block) if block else 0
    want = HEADER_BYTES + 4 * (entries + nb)
    if block <= 0 or os.path.getsize(local) != want:
        raise ShardFormatError(f"{path}: {os.path.getsize(local)} bytes on disk, header promises {want} (truncated)")
    return {"n_tokens": n, "entries": entries, "block": block, "n_blocks": nb, "max_len": int(hd[4]),
            "vocab_size": int(hd[5]), "build_id": hd[8:16].tobytes(), "local": local}


def read_sa(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(sorted local positions, block minima, block size) of a `.lmsa` file, memory-mapped."""
    h = read_sa_header(path)
    if h["entries"] == 0:
        return np.zeros(0, "<u4"), np.zeros(0, "<u4"), h["block"]
    sa = np.memmap(h["local"], dtype="<u4", mode="r", offset=HEADER_BYTES, shape=(h["entries"],))
    mins = np.memmap(h["local"], dtype="<u4", mode="r", offset=HEADER_BYTES + 4 * h["entries"], shape=(h["n_blocks"],))
    return sa, mins, h["block"]


def lmatch_paths(manifest, split: str) -> list[str]:
    """The `.lmatch` files of a split, in shard order, from `manifest.extras['lmatch']`."""
    ex = manifest.extras.get(EXTRAS_KEY)
    if not ex:
        raise ShardFormatError(f"{manifest.root}: no lmatch index in the manifest (run jobs.build_index)")
    return [storage.join(manifest.root, e["file"]) for e in ex["splits"].get(split, [])]


def sa_paths(manifest) -> list[str]:
    """The `.lmsa` (sorted positions) files of the train split, in shard order."""
    ex = manifest.extras.get(EXTRAS_KEY)
    if not ex:
        raise ShardFormatError(f"{manifest.root}: no lmatch index in the manifest (run jobs.build_index)")
    return [storage.join(manifest.root, e["sa_file"]) for e in ex["splits"].get("train", [])]


# ----------------------------------------------------------------------------- serving queries

def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LMatchIndex:
    """The train split's lmatch query structure, memory-mapped: longest earliest match of a
    context (new text) against the train split, same definition as the build."""

    def __init__(self, manifest, max_len: int = MAX_LEN):
        self.manifest = manifest
        self.max_len = max_len
        self.eot = int(manifest.eot_id)
        self.vocab_size = int(manifest.vocab_size)
        self.none_id = self.vocab_size
        self.stream = SplitStream(manifest, "train")
        self.tokens = [self.stream.shard(k) for k in range(len(self.stream.infos))]
        self.sas = []
        for k, path in enumerate(sa_paths(manifest)):
            sa, mins, block = read_sa(path)
            self.sas.append((sa, mins, block))
        if len(self.sas) != len(self.tokens):
            raise ShardFormatError(f"{manifest.root}: lmatch index lists {len(self.sas)} train shards, "
                                   f"the manifest {len(self.tokens)}")
        # history: the max_len - 1 tokens before each shard (documents cross shard boundaries)
        self.hist = [self.stream.read(int(self.stream.offsets[k]) - (max_len - 1), int(self.stream.offsets[k])).tolist()
                     for k in range(len(self.tokens))]

    @classmethod
    def open(cls, dataset_root: str) -> "LMatchIndex":
        return cls(load_manifest(dataset_root))

    def _key(self, k: int, p: int) -> tuple:
        """Reversed context of local position p of train shard k (a tuple of token ids)."""
        lo = p - (self.max_len - 1)
        toks = self.tokens[k]
        if lo >= 0:
            seg = toks[lo: p + 1].tolist()
        else:
            h = self.hist[k]
            seg = h[max(0, len(h) + lo):] + toks[: p + 1].tolist()
        seg.reverse()
        try:
            seg = seg[: seg.index(self.eot, 1)]
        except ValueError:
            pass
        return tuple(seg)

    def query_key(self, context_ids: Sequence[int]) -> tuple:
        seg = [int(t) for t in list(context_ids)[-self.max_len:]]
        seg.reverse()
        if not seg or seg[0] == self.eot:
            return ()
        try:
            seg = seg[: seg.index(self.eot, 1)]
        except ValueError:
            pass
        return tuple(seg)

    def _range_min(self, k: int, lo: int, hi: int) -> int:
        sa, mins, block = self.sas[k]
        b0, b1 = -(-lo // block), hi // block
        if b0 >= b1:
            return int(np.min(sa[lo:hi]))
        parts = [int(np.min(mins[b0:b1]))]
        if lo < b0 * block:
            parts.append(int(np.min(sa[lo: b0 * block])))
        if b1 * block < hi:
            parts.append(int(np.min(sa[b1 * block: hi])))
        return min(parts)

    def _follower(self, k: int, p: int) -> int:
        if p + 1 < len(self.tokens[k]):
            return int(self.tokens[k][p + 1])
        for kk in range(k + 1, len(self.tokens)):
            if len(self.tokens[kk]):
                return int(self.tokens[kk][0])
        return self.none_id  # not reached: the final stream position is never in the sorted order

    def lookup_key(self, q: tuple) -> tuple[int, int, int]:
        """(next id, length, global position j) for a reversed-context key."""
        best = (self.none_id, 0, -1)
        if not q:
            return best
        for k, (sa, _, _) in enumerate(self.sas):
            n = len(sa)
            if n == 0:
                continue
            key = lambda p, k=k: self._key(k, int(p))  # noqa: E731
            ip = bisect.bisect_left(sa, q, key=key)
            L = 0
            if ip > 0:
                L = _lcp(q, key(sa[ip - 1]))
            if ip < n:
                L = max(L, _lcp(q, key(sa[ip])))
            if L == 0 or L < best[1]:
                continue
            pref = q[:L]
            kl = lambda p, k=k, L=L: self._key(k, int(p))[:L]  # noqa: E731
            lo = bisect.bisect_left(sa, pref, 0, ip, key=kl)
            hi = bisect.bisect_right(sa, pref, ip, n, key=kl)
            p = self._range_min(k, lo, hi)
            if L > best[1]:  # equal L: the earlier shard (found first) keeps it
                best = (self._follower(k, p), L, int(self.stream.offsets[k]) + p)
        return best

    def lookup(self, context_ids: Sequence[int]) -> tuple[int, int]:
        """(next id, match length) for the text `context_ids` (NONE = vocab_size, 0 if no match)."""
        nxt, L, _ = self.lookup_key(self.query_key(context_ids))
        return nxt, L

    def lookup_batch(self, contexts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Vectorized over many contexts: (next ids, lengths) arrays."""
        nd = next_dtype(self.vocab_size)
        nxt = np.full(len(contexts), self.none_id, dtype=nd)
        ln = np.zeros(len(contexts), dtype=np.uint8)
        for i, c in enumerate(contexts):
            nxt[i], ln[i] = self.lookup(c)
        return nxt, ln
