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

Algorithm (`longest_earliest`, all numpy)
-----------------------------------------
A level loop, one token of the reversed context per level L = 1..32, over the entries still in a
group (entries sharing their first L - 1 tokens) of size >= 2. Each level sorts those entries by
(group, token + 1 at offset L - 1 (0 = the context ended), entry index) with ONE np.sort of
packed uint64 words (about 10x faster than an argsort; a lexsort when the three do not fit in 64
bits); the first entry of each new subgroup is its earliest, so an entry matches L tokens
exactly when it is not first and that first entry is a candidate. Groups are numbered by the
slot where they start in the final key order, which therefore falls out of the same loop (the
`.lmsa` order). Groups of length >= 1 share their first token, so the build splits the token
ids into ranges and runs the loop per range over the whole split (`compute_range`): no
cross-chunk merge, and the ranges together are bitwise one pass (tested).

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

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from app import storage
from app.data.shards import HEADER_BYTES, HEADER_INTS, ShardFormatError, load_manifest, read_header, read_shard

MAX_LEN = 32
FORMAT_VERSION = 1
MAGIC_LMATCH = 0x54414D4C  # "LMAT"
MAGIC_SA = 0x41534D4C  # "LMSA"
SA_BLOCK = 256
LMATCH_SUFFIX = ".lmatch"
SA_SUFFIX = ".lmsa"
EXTRAS_KEY = "lmatch"


# ----------------------------------------------------------------------------- the level loop

def next_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every next id (vocab ids and NONE = vocab_size) fits, else uint32."""
    return np.dtype("<u2") if vocab_size + 1 <= 65535 else np.dtype("<u4")


def _run_first(starts: np.ndarray) -> np.ndarray:
    """For each index, the index of the start of its run (`starts[k]` marks a run start)."""
    return np.maximum.accumulate(np.where(starts, np.arange(len(starts)), 0))


def _sort_level(gid: np.ndarray, lane: np.ndarray, e: np.ndarray, lane_bits: int, e_bits: int):
    """(gid, lane, e) sorted by (gid, lane, e). One np.sort of packed uint64 words when the three
    fit in 64 bits (much faster than an argsort), else a lexsort."""
    if 2 * e_bits + lane_bits > 64:
        perm = np.lexsort((e, lane, gid))
        return gid[perm], lane[perm], e[perm]
    u = np.uint64
    v = (gid.astype(u) << u(lane_bits + e_bits)) | (lane.astype(u) << u(e_bits)) | e.astype(u)
    v.sort()
    return ((v >> u(lane_bits + e_bits)).astype(np.int64), ((v >> u(e_bits)) & u((1 << lane_bits) - 1)).astype(np.int64),
            (v & u((1 << e_bits) - 1)).astype(np.int64))


def longest_earliest(ext: np.ndarray, p: np.ndarray, n_cand: int, eot: int, vocab_size: int,
                     max_len: int = MAX_LEN):
    """The level loop over entries e = 0..m-1 at stream indices p[e] of `ext` (non-EOT tokens, in
    tie order: a smaller e is earlier). Entry f is a candidate for e when f < min(e, n_cand).

    Returns (L, first, order): L[e] (uint8) the longest common prefix of key(p[e]) with a
    candidate's key, first[e] the earliest candidate reaching it (-1 when L = 0), and `order`, the
    entries sorted by (key, e)."""
    m = len(p)
    L = np.zeros(m, np.uint8)
    first = np.full(m, -1, np.int64)
    order = np.empty(m, np.int64)
    lane_bits, e_bits = int(vocab_size).bit_length(), max(1, (m - 1).bit_length())
    act = np.arange(m)  # entries of groups (sharing lv - 1 tokens) of size >= 2, in key order
    gid = np.zeros(m, np.int64)  # their group: the slot in `order` where the group starts
    for lv in range(1, max_len + 1):
        if act.size == 0:
            break
        q = p[act] - (lv - 1)
        lane = ext[np.maximum(q, 0)].astype(np.int64) + 1
        if lv > 1:  # the key ends at the stream start or at the previous document's EOT
            lane[(q < 0) | (lane == eot + 1)] = 0
        g, ln, e = _sort_level(gid, lane, act, lane_bits, e_bits)
        k = np.arange(len(e))
        new_g = np.ones(len(e), bool)
        new_g[1:] = g[1:] != g[:-1]
        new_sub = new_g.copy()
        new_sub[1:] |= ln[1:] != ln[:-1]
        slot = g + k - _run_first(new_g)
        sub = _run_first(new_sub)
        fe = e[sub]  # the earliest entry sharing lv tokens (entries are in e order within a subgroup)
        hit = (ln > 0) & (fe < np.minimum(e, n_cand))
        L[e[hit]] = lv
        first[e[hit]] = fe[hit]
        # keep refining subgroups of >= 2 entries whose key goes on; the others have their slot
        single = new_sub & np.append(new_sub[1:], True)
        keep = (ln > 0) & ~single if lv < max_len else np.zeros(len(e), bool)
        order[slot[~keep]] = e[~keep]
        act, gid = e[keep], slot[sub[keep]]
    return L, first, order


@dataclass
class Matches:
    """Answers of `match_tokens` for its entries (positions whose token is in its token range)."""

    train_pos: np.ndarray  # train positions of the entries (ascending)
    train_next: np.ndarray  # their next ids (NONE = vocab_size)
    train_len: np.ndarray  # their lengths (uint8)
    train_j: np.ndarray  # their chosen train position j (-1 when none)
    train_order: np.ndarray  # train positions in (key, position) order, final unterminated one left out
    val_pos: np.ndarray  # the same for the query stream's entries (j into train)
    val_next: np.ndarray
    val_len: np.ndarray
    val_j: np.ndarray


def match_tokens(train: np.ndarray, eot: int, vocab_size: int, val: np.ndarray | None = None,
                 lo: int = 0, hi: int | None = None, max_len: int = MAX_LEN) -> Matches:
    """Longest earliest matches of the positions whose token t has lo <= t < hi: train positions
    against earlier train text, `val` positions against all train text. Groups sharing >= 1 token
    share their first token, so disjoint token ranges are independent: their answers together are
    exactly one pass over the whole split (this is how the build is split into tasks)."""
    hi = vocab_size if hi is None else hi
    n = len(train)
    parts = [np.asarray(train)]
    if val is not None:  # an EOT between the streams: val keys never run into train text
        parts += [np.array([eot], dtype=parts[0].dtype), np.asarray(val)]
    ext = np.concatenate(parts) if len(parts) > 1 else parts[0]
    sel = (ext >= lo) & (ext < hi) & (ext != eot)
    sel[n: n + 1] = False
    p = np.flatnonzero(sel)
    n_train = int(np.searchsorted(p, n))
    final = n_train > 0 and p[n_train - 1] == n - 1  # a final unterminated train position has no follower
    L, first, order = longest_earliest(ext, p, n_train - int(final), eot, vocab_size, max_len)
    j = np.where(first >= 0, p[np.maximum(first, 0)], -1)
    nxt = np.where(first >= 0, ext[np.minimum(j + 1, len(ext) - 1)], vocab_size).astype(next_dtype(vocab_size))
    po = p[order]
    train_order = po[po < n - int(final)]
    return Matches(p[:n_train], nxt[:n_train], L[:n_train], j[:n_train], train_order,
                   p[n_train:] - (n + 1), nxt[n_train:], L[n_train:], j[n_train:])


def _scatter(n: int, pos: np.ndarray, nxt: np.ndarray, ln: np.ndarray, j: np.ndarray, vocab_size: int):
    out_n = np.full(n, vocab_size, dtype=next_dtype(vocab_size))
    out_l = np.zeros(n, np.uint8)
    out_j = np.full(n, -1, np.int64)
    out_n[pos], out_l[pos], out_j[pos] = nxt, ln, j
    return out_n, out_l, out_j


def lmatch_stream(tokens: np.ndarray, eot: int, vocab_size: int, max_len: int = MAX_LEN):
    """One pass over a whole (train) stream: (next ids, lengths, j) of every position."""
    r = match_tokens(np.asarray(tokens), eot, vocab_size, max_len=max_len)
    return _scatter(len(tokens), r.train_pos, r.train_next, r.train_len, r.train_j, vocab_size)


def lmatch_against(train: np.ndarray, query: np.ndarray, eot: int, vocab_size: int, max_len: int = MAX_LEN):
    """One pass of a (val) stream against a whole train stream: (next ids, lengths, j into train)."""
    r = match_tokens(np.asarray(train), eot, vocab_size, val=np.asarray(query), max_len=max_len)
    return _scatter(len(query), r.val_pos, r.val_next, r.val_len, r.val_j, vocab_size)


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

    def tokens(self) -> np.ndarray:
        """The whole split as one array of its stored dtype (2 or 4 bytes per token)."""
        arrs = [np.asarray(self.shard(k)) for k in range(len(self.infos))]
        return np.concatenate(arrs) if arrs else np.zeros(0, np.dtype(self.manifest.dtype))


# ----------------------------------------------------------------------------- the build, by token ranges

def token_counts(manifest, splits: Sequence[str], verify: bool = False) -> np.ndarray:
    """How often each token id occurs in `splits` (the EOT left out): sizes the token ranges.

    Reads every shard once: a missing, truncated or wrong-dtype shard, and with `verify` one whose
    sha256 is not the manifest's, raises ShardFormatError with its path."""
    counts = np.zeros(int(manifest.vocab_size), np.int64)
    for split in splits:
        st = SplitStream(manifest, split)
        for k in range(len(st.infos)):
            c = np.bincount(np.asarray(st.shard(k, verify=verify)), minlength=len(counts))
            counts += c[: len(counts)]
    counts[int(manifest.eot_id)] = 0
    return counts


def token_ranges(counts: np.ndarray, n_ranges: int) -> list[tuple[int, int]]:
    """Contiguous token-id ranges [lo, hi) covering every id, of about equal total count (one id
    is never split, so a range holds at most one frequent id more than its share)."""
    c = np.cumsum(counts)
    targets = c[-1] * np.arange(1, max(1, n_ranges)) / max(1, n_ranges)
    edges = np.unique(np.concatenate([[0], np.searchsorted(c, targets) + 1, [len(counts)]]).clip(0, len(counts)))
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


@dataclass
class PiecePart:
    """One token range's share of one piece (a shard of a split); shard-local positions."""

    pos: np.ndarray  # positions (uint32) whose token is in the range
    next_ids: np.ndarray
    lengths: np.ndarray
    order: np.ndarray | None  # train: the range's positions of this shard in key order (uint32)


def _by_shard(offsets: np.ndarray, pos: np.ndarray) -> list[np.ndarray]:
    """Indices of `pos` (global positions) grouped by shard, each group in its input order."""
    kid = np.searchsorted(offsets, pos, side="right") - 1
    perm = np.argsort(kid, kind="stable")
    cuts = np.searchsorted(kid[perm], np.arange(len(offsets)))
    return [perm[cuts[k]: cuts[k + 1]] for k in range(len(offsets) - 1)]


def compute_range(manifest, lo: int, hi: int, pieces: Sequence[tuple[str, int]],
                  max_len: int = MAX_LEN) -> list[PiecePart]:
    """The answers of the positions with token ids in [lo, hi) for each piece (split, shard k).

    Reads the whole train split (and the val split when a val piece is asked for); the parts of
    all ranges together give each piece exactly its one-pass answer (see `match_tokens`)."""
    train = SplitStream(manifest, "train")
    vals = {s for s, _ in pieces if s != "train"}
    if len(vals) > 1:
        raise ValueError(f"one query split per build call, got {sorted(vals)}")
    own = SplitStream(manifest, vals.pop()) if vals else None
    r = match_tokens(train.tokens(), int(manifest.eot_id), int(manifest.vocab_size),
                     None if own is None else own.tokens(), lo, hi, max_len)
    out = []
    groups = {"train": _by_shard(train.offsets, r.train_pos)}
    orders = _by_shard(train.offsets, r.train_order)
    if own is not None:
        groups["val"] = _by_shard(own.offsets, r.val_pos)
    for split, k in pieces:
        kind = "train" if split == "train" else "val"
        st = train if kind == "train" else own
        idx = groups[kind][k]
        pos, nxt, ln = getattr(r, f"{kind}_pos"), getattr(r, f"{kind}_next"), getattr(r, f"{kind}_len")
        a = int(st.offsets[k])
        order = (r.train_order[orders[k]] - a).astype(np.uint32) if kind == "train" else None
        out.append(PiecePart((pos[idx] - a).astype(np.uint32), nxt[idx], ln[idx], order))
    return out


def assemble_piece(n_tokens: int, vocab_size: int, parts: Sequence[PiecePart]):
    """(next ids, lengths, sorted positions or None) of a piece from its parts, given in token-range
    order (so the sorted positions of the ranges concatenate into the shard's key order)."""
    nxt = np.full(n_tokens, vocab_size, dtype=next_dtype(vocab_size))
    ln = np.zeros(n_tokens, np.uint8)
    for pt in parts:
        nxt[pt.pos], ln[pt.pos] = pt.next_ids, pt.lengths
    orders = [pt.order for pt in parts if pt.order is not None]
    sa = np.concatenate(orders).astype(np.uint32) if orders else None
    return nxt, ln, sa


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

SAMPLE_EVERY = 64  # an in-memory key of every 64th sorted position (~1.06 bytes per token of RAM)


class LMatchIndex:
    """The train split's lmatch query structure: longest earliest match of a context (new text)
    against the train split, same definition as the build.

    In RAM: the train tokens as one "lane" stream (token + 1, 0 at the EOT, zeros before the
    stream start; 2 bytes per token for uint16 vocabularies) and a sample of every
    `sample_every`-th sorted key of every shard, as one sorted array of byte strings (a 4-byte
    big-endian shard number, then big-endian lanes: byte order = key order), ~1.06 bytes per token.
    Memory-mapped: each shard's sorted positions and block minima (`.lmsa`).

    A lookup is a fixed number of numpy calls, whatever the number of shards: one searchsorted
    of the query (prefixed by each shard number) into the sample finds every shard's window of
    `sample_every` + 1 sorted keys that holds the query's neighbours; the longest match L of
    each shard is the longest common prefix with a key of its window (one gather + compare over
    all windows); the earliest shard reaching L holds the answer j = the smallest position among
    its keys sharing L lanes with the query: read from the same window when that range of keys
    lies inside it, else bounded by two more sample searches + windows and a range minimum over
    the block minima. Only the window copies loop over shards (one slice each)."""

    def __init__(self, manifest, max_len: int = MAX_LEN, sample_every: int = SAMPLE_EVERY):
        self.manifest = manifest
        self.max_len = max_len
        self.every = int(sample_every)
        if self.every < 1:
            raise ValueError(f"sample_every must be >= 1, got {sample_every}")
        self.eot = int(manifest.eot_id)
        self.vocab_size = int(manifest.vocab_size)
        self.none_id = self.vocab_size
        self.lane = np.dtype("<u2") if self.vocab_size + 1 < 65535 else np.dtype("<u4")
        self._never = self.vocab_size + 1  # a lane value no key holds (lanes are 0..vocab_size)
        self.lane_be = self.lane.newbyteorder(">")
        self.stream = SplitStream(manifest, "train")
        self.offsets = self.stream.offsets
        self.sas = [read_sa(path) for path in sa_paths(manifest)]
        if len(self.sas) != len(self.stream.infos):
            raise ShardFormatError(f"{manifest.root}: lmatch index lists {len(self.sas)} train shards, "
                                   f"the manifest {len(self.stream.infos)}")
        bid = build_id(manifest, max_len)
        for path, shard in zip(sa_paths(manifest), self.stream.infos):
            h = read_sa_header(path)
            if h["build_id"] != bid or h["n_tokens"] != int(shard["n_tokens"]):
                raise ShardFormatError(f"{path}: built from other train shards than the manifest's (stale "
                                       "index: run jobs.build_index)")
        self._sa = [np.asarray(sa) for sa, _, _ in self.sas]  # plain ndarray views of the memmaps
        self._n_sa = np.array([len(sa) for sa in self._sa], np.int64)
        # the lane stream; PAD zeros in front: a key reaching before the stream start has ended,
        # and global position -1 reads max_len + 1 zero lanes (an empty window slot)
        self._pad = max_len + 1
        toks = self.stream.tokens()
        ls = np.zeros(self._pad + len(toks), self.lane)
        ls[self._pad:] = toks
        ls[self._pad:] += 1
        ls[self._pad:][toks == self.eot] = 0
        self._ls = ls
        self._back = self._pad - np.arange(max_len + 1)  # lane i of global position g: _ls[g + _back[i]]
        self._klen = 4 + self.lane.itemsize * max_len  # bytes of a prefixed sample key
        self._prefix = np.arange(len(self._sa), dtype=">u4").view(np.uint8).reshape(-1, 4)
        starts, keys = [0], []
        for k, sa in enumerate(self._sa):
            g = sa[:: self.every].astype(np.int64) + self.offsets[k]
            keys.append(self._key_bytes(g, k))
            starts.append(starts[-1] + len(g))
        self._sample = (np.concatenate(keys) if keys else np.zeros(0, f"S{self._klen}"))
        self._sstart = np.array(starts, np.int64)

    @classmethod
    def open(cls, dataset_root: str, **kw) -> "LMatchIndex":
        return cls(load_manifest(dataset_root), **kw)

    # -- keys
    def _raw_lanes(self, g: np.ndarray) -> np.ndarray:
        """[..., max_len + 1] lanes of global positions g, NOT cut where the context ended (a
        query lane is never 0, so a prefix compare with the query stops there by itself)."""
        return self._ls[g[..., None] + self._back]

    def _key_bytes(self, g: np.ndarray, k: int | None) -> np.ndarray:
        """Byte-string keys (prefixed by shard k unless k is None) of global positions g (1-d)."""
        a = self._raw_lanes(g)[:, : self.max_len]
        a = a * np.logical_and.accumulate(a != 0, axis=1)  # lanes after the context ended are 0
        return self._bytes(a, k)

    def _bytes(self, lanes: np.ndarray, k: int | None) -> np.ndarray:
        b = np.ascontiguousarray(lanes, dtype=self.lane_be).view(np.uint8).reshape(len(lanes), -1)
        if k is not None:
            b = np.concatenate([np.broadcast_to(self._prefix[k], (len(b), 4)), b], axis=1)
        return np.ascontiguousarray(b).view(f"S{b.shape[1]}").ravel()

    def query_lanes(self, context_ids: Sequence[int]) -> np.ndarray:
        """[max_len + 1] lanes of the reversed context (token + 1), 0 from where it ends: at its
        start, at an earlier EOT or at a token outside the vocabulary (no key holds one)."""
        try:
            tail = context_ids[-self.max_len:]
        except TypeError:  # an iterable without slicing (a deque)
            tail = list(context_ids)[-self.max_len:]
        q = np.asarray(tail, dtype=np.int64)[::-1]
        bad = (q == self.eot) | (q < 0) | (q >= self.vocab_size)
        n = int(bad.argmax()) if bad.any() else len(q)
        lanes = np.zeros(self.max_len + 1, self.lane)
        lanes[:n] = q[:n] + 1
        return lanes

    def query_key(self, context_ids: Sequence[int]) -> tuple:
        """The reversed-context key of `context_ids` as a tuple of token ids (empty: no match)."""
        lanes = self.query_lanes(context_ids)
        return tuple(int(x) - 1 for x in lanes[: int(np.count_nonzero(lanes))])

    # -- lookups
    def lookup_key(self, q: tuple) -> tuple[int, int, int]:
        """(next id, length, global position j) for a reversed-context key (token ids)."""
        q = [int(t) for t in q[: self.max_len]]
        return self._lookup(self.query_lanes(q[::-1]) if q and q[0] != self.eot else np.zeros(1, self.lane))

    def lookup(self, context_ids: Sequence[int]) -> tuple[int, int]:
        """(next id, match length) for the text `context_ids` (NONE = vocab_size, 0 if no match)."""
        nxt, L, _ = self._lookup(self.query_lanes(context_ids))
        return nxt, L

    def continuation(self, context_ids: Sequence[int], k: int) -> tuple[list[int], int]:
        """(up to k tokens that followed the longest earliest match of `context_ids` in the train split,
        match length): the match's follower (`lookup`'s next id) and the tokens after it, ending with its
        document's EOT at the latest; ([], 0) when nothing matches. A draft for speculative decoding."""
        _, L, j = self._lookup(self.query_lanes(context_ids))
        if L == 0 or k < 1:
            return [], L
        nxt = self.stream.read(j + 1, j + 1 + k).tolist()
        end = nxt.index(self.eot) + 1 if self.eot in nxt else len(nxt)
        return nxt[:end], L

    def lookup_batch(self, contexts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Many contexts: (next ids, lengths) arrays."""
        nd = next_dtype(self.vocab_size)
        nxt = np.full(len(contexts), self.none_id, dtype=nd)
        ln = np.zeros(len(contexts), dtype=np.uint8)
        for i, c in enumerate(contexts):
            nxt[i], ln[i], _ = self._lookup(self.query_lanes(c))
        return nxt, ln

    def _lookup(self, qv: np.ndarray) -> tuple[int, int, int]:
        K = len(self._sa)
        if qv[0] == 0 or K == 0 or len(self._sample) == 0:
            return self.none_id, 0, -1
        E = self.every
        # 1. every shard's window: the sorted keys between the sample keys around the query
        qb = np.frombuffer(qv[: self.max_len].astype(self.lane_be).tobytes(), np.uint8)
        Q = np.empty((K, self._klen), np.uint8)
        Q[:, :4] = self._prefix
        Q[:, 4:] = qb
        i0 = np.searchsorted(self._sample, Q.view(f"S{self._klen}").ravel(), "left") - self._sstart[:-1]
        wlo = np.maximum(0, (i0 - 1) * E)
        whi = np.minimum(self._n_sa, i0 * E + 1)  # + 1: the sample key at i0 itself
        G = np.full((K, E + 1), -1, np.int64)  # global positions, -1 = an empty slot (no lanes)
        for k, (a, b) in enumerate(zip(wlo.tolist(), whi.tolist())):
            if b > a:
                np.add(self._sa[k][a:b], self.offsets[k], out=G[k, : b - a], casting="unsafe")
        # 2. longest common prefix with each window key (the longest of a shard is at a neighbour)
        qc = np.where(qv > 0, qv, self._never)  # the query's ended lanes match nothing
        eq = self._raw_lanes(G) == qc  # qc[max_len] never matches: argmin finds a False
        lcp = eq.argmin(axis=2)
        best = lcp.max(axis=1)
        k = int(best.argmax())  # the earliest shard reaching L holds the earliest j
        L = int(best[k])
        if L == 0:
            return self.none_id, 0, -1
        # 3. the smallest position among shard k's keys sharing L lanes with the query
        m = lcp[k] >= L
        n_win = int(whi[k] - wlo[k])
        if (wlo[k] == 0 or not m[0]) and (whi[k] == self._n_sa[k] or not m[n_win - 1]):
            j = int(G[k][m].min())  # the whole range of such keys lies in the window
        else:
            j = int(self.offsets[k]) + self._range_min(k, *self._range(k, qv, L))
        t = int(self._ls[j + 1 + self._pad])  # j + 1 < n: the final position is never a candidate
        return (self.eot if t == 0 else t - 1), L, j

    def _range(self, k: int, qv: np.ndarray, L: int) -> tuple[int, int]:
        """[lo, hi): shard k's sorted slots whose keys share the first L lanes with the query."""
        low = qv[: self.max_len].copy()
        low[L:] = 0
        top = low.copy()
        top[L:] = np.iinfo(self.lane).max  # above every key sharing the first L lanes
        keys = self._bytes(np.stack([low, top]), k)
        E, s0, n = self.every, int(self._sstart[k]), int(self._n_sa[k])
        out = []
        for key, side in zip(keys, ("left", "right")):
            i = int(np.searchsorted(self._sample, key, side)) - s0
            a, b = max(0, (i - 1) * E), min(n, i * E)
            if b > a:
                win = self._key_bytes(self._sa[k][a:b].astype(np.int64) + self.offsets[k], k)
                a += int(np.searchsorted(win, key, side))
            out.append(a)
        return out[0], out[1]

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
