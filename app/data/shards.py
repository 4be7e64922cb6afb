"""Token shard format (a versioned 1 KiB header, then raw tokens) and the dataset manifest.

Header: 256 little-endian int32: [0] magic, [1] format version, [2] bytes per token (2 or 4),
[3] token count; the rest is zero. `manifest.json`, written last, lists every shard of every
split with its token count and checksum, so a dataset without a manifest is unfinished.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from app import storage

MAGIC = 0x53504C4D  # "SPLM"
FORMAT_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST = "manifest.json"


class ShardFormatError(ValueError):
    """A shard or manifest that is missing, truncated, or not in this format."""


def encode_shard(tokens: np.ndarray) -> bytes:
    """The bytes of a shard file holding `tokens` (uint16 or uint32)."""
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"shard tokens must be uint16 or uint32, got {tokens.dtype}")
    if len(tokens) >= 2**31:
        raise ValueError("a shard holds fewer than 2**31 tokens")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = [MAGIC, FORMAT_VERSION, tokens.dtype.itemsize, len(tokens)]
    return header.tobytes() + tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()


def write_shard(path: str, tokens: np.ndarray) -> dict[str, Any]:
    """Write a shard atomically; returns `{"n_tokens", "sha256"}` (checksum of the whole file)."""
    data = encode_shard(tokens)
    storage.write_bytes(path, data)
    return {"n_tokens": int(len(tokens)), "sha256": hashlib.sha256(data).hexdigest()}


def read_header(path: str, magic: int, version: int, what: str) -> tuple[np.ndarray, str]:
    """The 1 KiB header (256 little-endian uint32) of a spotlm binary file and the file's local path;
    ShardFormatError (naming `what`) when the file is missing, not ours, or another format version."""
    try:
        local = storage.local_path(path)
        with open(local, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<u4")
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: {what} file is missing") from None
    if len(header) < HEADER_INTS or header[0] != magic:
        raise ShardFormatError(f"{path}: not a spotlm {what} file (bad magic number)")
    if header[1] != version:
        raise ShardFormatError(f"{path}: {what} format version {header[1]}, this code reads {version}")
    return header, local


def read_shard(path: str, verify_sha256: str | None = None) -> np.ndarray:
    """The tokens of a shard, memory-mapped read-only (S3 shards are cached locally first)."""
    header, local = read_header(path, MAGIC, FORMAT_VERSION, "shard")
    if header[2] not in (2, 4):
        raise ShardFormatError(f"{path}: unsupported token size {header[2]} bytes")
    itemsize, n = int(header[2]), int(header[3])
    actual = os.path.getsize(local)
    if actual != HEADER_BYTES + n * itemsize:
        raise ShardFormatError(f"{path}: {actual} bytes on disk, header promises {HEADER_BYTES + n * itemsize} "
                               "(truncated or corrupt)")
    if verify_sha256 is not None:
        with open(local, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != verify_sha256:
            raise ShardFormatError(f"{path}: checksum mismatch (corrupt shard)")
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(local, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


@dataclass
class Manifest:
    """What a tokenize run produced: shards per split, tokenizer, counts. Saved as manifest.json."""

    format: str = "spotlm-shards"
    version: int = 1
    dtype: str = "uint16"  # token dtype of every shard
    vocab_size: int = 0
    eot_id: int = 0  # end-of-text id appended after every document
    tokenizer_file: str = "tokenizer.json"  # relative to the manifest's directory
    tokenizer_sha256: str = ""
    shard_tokens: int = 0  # tokens per full shard
    shards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> [{file, n_tokens, sha256}]
    docs: dict[str, int] = field(default_factory=dict)  # documents per split
    rejected: dict[str, int] = field(default_factory=dict)  # rejected records per reason
    inputs: int = 0  # input files read
    config: dict[str, Any] = field(default_factory=dict)  # the resolved tokenize config
    extras: dict[str, Any] = field(default_factory=dict)  # per-token arrays added by later stages (index)
    root: str = field(default="", compare=False, repr=False)  # directory (not saved)

    def shard_paths(self, split: str) -> list[str]:
        return [storage.join(self.root, s["file"]) for s in self.shards.get(split, [])]

    def num_tokens(self, split: str) -> int:
        return sum(s["n_tokens"] for s in self.shards.get(split, []))

    @property
    def tokenizer_path(self) -> str:
        return storage.join(self.root, self.tokenizer_file)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        return d

    def save(self) -> None:
        storage.write_json(storage.join(self.root, MANIFEST), self.to_json())


def load_manifest(root: str) -> Manifest:
    """Read `<root>/manifest.json`; a clear ShardFormatError if it is missing or not ours."""
    path = storage.join(storage.absolute(root), MANIFEST)
    try:
        data = storage.read_json(path)
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: no manifest (not a tokenized dataset, or tokenizing did not finish)") from None
    except ValueError as e:
        raise ShardFormatError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict) or data.get("format") != "spotlm-shards":
        raise ShardFormatError(f"{path}: not a spotlm shards manifest")
    if data.get("version") != 1:
        raise ShardFormatError(f"{path}: manifest version {data.get('version')}, this code reads 1")
    known = {f.name for f in fields(Manifest)} - {"root"}
    m = Manifest(**{k: v for k, v in data.items() if k in known})
    m.root = storage.absolute(root)
    return m
