"""The tokenize stage: raw text files -> fixed-size token shards + manifest, with Ray Data.

Each input file is one unit of work: an actor of the pool (tokenizer loaded once) parses its
records, rejects bad ones, tokenizes, appends end-of-text after each document, splits documents
train/val by a hash of their text, and writes per-file token arrays under `<output>/_work/`.
The driver then packs those, in sorted input order, into `train_%06d.bin` / `val_%06d.bin`
shards and writes `manifest.json` last. Every file is written atomically and finished work is
skipped when the job runs again, so an interrupted run resumes without loss or duplication.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np

from app import storage
from app.config import ConfigError, to_dict
from app.log import Progress, get_logger
from app.data.shards import Manifest, ShardFormatError, encode_shard, load_manifest, read_shard
from app.data.tokenizer import eot_id, load_tokenizer, token_dtype, tokenizer_sha256, train_bpe, train_chars

log = get_logger(__name__)
SPLITS = ("train", "val")


class InputError(ValueError):
    """Inputs that cannot be read at all (the job fails fast with this one-line message)."""


@dataclass
class TokenizeConfig:
    """Tokenize text files into token shards."""

    inputs: list[str] = field(default_factory=list)  # globs/paths, local or s3://: .jsonl, .parquet, else plain text
    output: str = "runs/shards"  # output directory, local or s3://
    tokenizer: str | None = None  # tokenizer.json to use; None = train a byte-level BPE on the data; "char" = characters
    vocab_size: int = 8192  # vocabulary of the trained BPE
    train_sample_bytes: int = 20_000_000  # text used to train the BPE (first files, in order)
    text_field: str = "text"  # field holding the text in .jsonl / .parquet records
    text_unit: Literal["file", "paragraph"] = "file"  # plain text: a whole file, or each blank-line paragraph, is a document
    val_fraction: float = 0.01  # share held out for validation: of documents (by text hash), or of each document's tail
    split: Literal["hash", "tail"] = "hash"  # hash: whole documents by text hash; tail: the last val_fraction of every document
    shard_tokens: int = 2**24  # tokens per shard file
    num_actors: int = 1  # tokenizer actors
    actor_cpus: float = 0.5  # CPUs per actor (fractional: leave room for Ray Data's read tasks)
    max_rejected_samples: int = 100  # bad records kept in rejected/rejected.jsonl
    keep_work: bool = False  # keep the per-file intermediate arrays in _work/

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: give at least one file or glob")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1 or self.num_actors < 1 or self.vocab_size < 300:
            raise ConfigError("shard_tokens and num_actors must be >= 1, vocab_size >= 300")


# ---------------------------------------------------------------- reading records

def _reject(reason: str, path: str, index: int, raw: Any) -> dict[str, Any]:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return {"reason": reason, "file": path, "record": index, "sample": text[:200]}


def iter_records(path: str, text_field: str, text_unit: str) -> Iterator[tuple[str | None, dict | None]]:
    """Yield `(text, None)` for each good document of a file and `(None, reject)` for each bad one."""
    data = storage.read_bytes(path)
    if path.endswith(".jsonl"):
        for i, line in enumerate(data.splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except UnicodeDecodeError:
                yield None, _reject("invalid_utf8", path, i, line)
                continue
            except ValueError:
                yield None, _reject("bad_json", path, i, line)
                continue
            yield _field(rec, text_field, path, i)
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if text_field not in table.column_names:
            for i in range(table.num_rows):
                yield None, _reject("missing_field", path, i, f"columns: {table.column_names}")
            return
        for i, value in enumerate(table.column(text_field).to_pylist()):
            yield _field({text_field: value}, text_field, path, i)
    else:  # plain text (.txt, source code, ...)
        pieces = data.split(b"\n\n") if text_unit == "paragraph" else [data]
        for i, raw in enumerate(pieces):
            yield _decode(raw, path, i)


def _decode(raw: bytes, path: str, index: int) -> tuple[str | None, dict | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, _reject("invalid_utf8", path, index, raw)
    if not text.strip():
        return None, _reject("empty_text", path, index, raw)
    return text, None


def _field(rec: Any, name: str, path: str, index: int) -> tuple[str | None, dict | None]:
    if not isinstance(rec, dict) or name not in rec:
        return None, _reject("missing_field", path, index, rec)
    text = rec[name]
    if not isinstance(text, str):
        return None, _reject("not_a_string", path, index, text)
    if not text.strip():
        return None, _reject("empty_text", path, index, text)
    return text, None


def split_of(text: str, val_fraction: float) -> str:
    """`val` for a stable `val_fraction` share of documents (by text hash), else `train`."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return "val" if h < val_fraction * 2**64 else "train"


# ---------------------------------------------------------------- the Ray Data stage

def _work_paths(output: str, index: int) -> dict[str, str]:
    base = storage.join(output, "_work", f"{index:06d}")
    return {"train": base + ".train.bin", "val": base + ".val.bin", "meta": base + ".json"}


class TokenizeFiles:
    """Ray Data actor: tokenizes whole input files, writes their per-split arrays to `_work/`."""

    def __init__(self, tokenizer_path: str, cfg: dict[str, Any]):
        self.tok = load_tokenizer(tokenizer_path)
        self.eot = eot_id(self.tok)
        self.dtype = token_dtype(self.tok.get_vocab_size())
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        metas = [self._file(str(p), int(i)) for p, i in zip(batch["path"], batch["index"])]
        return {"meta": np.array([json.dumps(m) for m in metas])}

    def _file(self, path: str, index: int) -> dict[str, Any]:
        out = _work_paths(self.cfg["output"], index)
        if storage.exists(out["meta"]):  # finished in an earlier, interrupted run
            return storage.read_json(out["meta"])
        docs: dict[str, list[str]] = {s: [] for s in SPLITS}
        rejects: list[dict] = []
        for text, rej in iter_records(path, self.cfg["text_field"], self.cfg["text_unit"]):
            if rej is not None:
                rejects.append(rej)
            elif self.cfg["split"] == "tail":  # nanoGPT's split: the head trains, the tail validates
                cut = round(len(text) * (1 - self.cfg["val_fraction"]))
                docs["train"].append(text[:cut])
                docs["val"].append(text[cut:])
            else:
                docs[split_of(text, self.cfg["val_fraction"])].append(text)
        meta: dict[str, Any] = {"path": path, "rejected": dict(Counter(r["reason"] for r in rejects)),
                                "rejected_samples": rejects[: self.cfg["max_rejected_samples"]]}
        for split in SPLITS:
            ids = [e.ids + [self.eot] for e in self.tok.encode_batch(docs[split])] if docs[split] else []
            tokens = np.fromiter((t for doc in ids for t in doc), dtype=self.dtype)
            storage.write_bytes(out[split], encode_shard(tokens))
            meta[split] = {"docs": len(docs[split]), "tokens": int(len(tokens))}
        storage.write_json(out["meta"], meta)  # last: marks this file done
        return meta


# ---------------------------------------------------------------- the driver

def resolve_inputs(patterns: list[str]) -> list[str]:
    """Every input file, sorted and de-duplicated; InputError if a pattern matches nothing."""
    files: list[str] = []
    for pattern in patterns:
        try:
            matched = storage.glob(pattern if storage.is_s3(pattern) else storage.absolute(pattern))
        except OSError as e:
            raise InputError(f"cannot read input {pattern!r}: {e}") from None
        if not matched:
            raise InputError(f"input {pattern!r} matches no file")
        files += matched
    return sorted(set(files))


def _prepare_tokenizer(cfg: TokenizeConfig, files: list[str], out: str) -> str:
    """Save the tokenizer beside the shards (once: a resumed run reuses it); returns its path."""
    path = storage.join(out, "tokenizer.json")
    if storage.exists(path):
        return path
    if cfg.tokenizer == "char":
        tok = train_chars(_sample_texts(cfg, files))
    elif cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        eot_id(tok)
    else:
        log.info("training a byte-level BPE (vocab %d) on up to %d bytes", cfg.vocab_size, cfg.train_sample_bytes)
        tok = train_bpe(_sample_texts(cfg, files), cfg.vocab_size)
    storage.write_text(path, tok.to_str())
    return path


def _sample_texts(cfg: TokenizeConfig, files: list[str]) -> Iterator[str]:
    budget = cfg.train_sample_bytes
    for path in files:
        for text, _ in iter_records(path, cfg.text_field, cfg.text_unit):
            if budget <= 0:
                return
            if text is not None:
                yield text[:budget]
                budget -= len(text)


def _tokenize_files(cfg: TokenizeConfig, files: list[str], out: str, tokenizer_path: str) -> list[dict]:
    import ray

    items = [{"path": p, "index": i} for i, p in enumerate(files)]
    worker_cfg = {**to_dict(cfg), "output": out}
    ds = ray.data.from_items(items).map_batches(
        TokenizeFiles, fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "cfg": worker_cfg},
        batch_size=1, num_cpus=cfg.actor_cpus, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors))
    order = {p: i for i, p in enumerate(files)}
    progress = Progress(log, "tokenize", len(files), "files")
    metas = []
    for row in ds.iter_rows():
        metas.append(json.loads(row["meta"]))
        progress.update()
    return sorted(metas, key=lambda m: order[m["path"]])


def _pack(out: str, split: str, files: int, shard_tokens: int, dtype: np.dtype) -> list[dict[str, Any]]:
    """Concatenate the per-file arrays of a split into full shards (the last may be partial)."""
    infos, buf, n = [], [], 0
    progress = Progress(log, f"packing {split}", files, "files")

    def flush(tokens: np.ndarray) -> None:
        name = f"{split}_{len(infos):06d}.bin"
        path = storage.join(out, name)
        data = encode_shard(tokens)
        if not (storage.exists(path) and storage.size(path) == len(data)):  # skip shards an earlier run wrote
            storage.write_bytes(path, data)
        infos.append({"file": name, "n_tokens": int(len(tokens)), "sha256": hashlib.sha256(data).hexdigest()})

    for i in range(files):
        progress.update()
        arr = read_shard(_work_paths(out, i)[split])
        while len(arr):
            take = min(shard_tokens - n, len(arr))
            buf.append(np.asarray(arr[:take], dtype=dtype))
            n, arr = n + take, arr[take:]
            if n == shard_tokens:
                flush(np.concatenate(buf))
                buf, n = [], 0
    if n:
        flush(np.concatenate(buf))
    return infos


def tokenize_corpus(cfg: TokenizeConfig) -> Manifest:
    """Run the tokenize stage (or finish an interrupted one); returns the manifest."""
    cfg.validate()
    t0 = time.perf_counter()
    out = storage.absolute(cfg.output)
    try:
        done = load_manifest(out)
        if done.config == to_dict(cfg):
            log.info("%s is already tokenized with this config", out)
            return done
    except ShardFormatError:
        pass
    files = resolve_inputs(cfg.inputs)
    log.info("tokenizing %d files into %s", len(files), out)
    tokenizer_path = _prepare_tokenizer(cfg, files, out)
    tok = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tok.get_vocab_size())
    metas = _tokenize_files(cfg, files, out, tokenizer_path)

    rejected: Counter = Counter()
    samples: list[dict] = []
    for m in metas:
        rejected.update(m["rejected"])
        samples += m["rejected_samples"]
    if samples:
        storage.write_text(storage.join(out, "rejected", "rejected.jsonl"),
                           "".join(json.dumps(s) + "\n" for s in samples[: cfg.max_rejected_samples]))
    manifest = Manifest(dtype=dtype.name, vocab_size=tok.get_vocab_size(), eot_id=eot_id(tok),
                        tokenizer_sha256=tokenizer_sha256(tok), shard_tokens=cfg.shard_tokens,
                        shards={s: _pack(out, s, len(files), cfg.shard_tokens, dtype) for s in SPLITS},
                        docs={s: sum(m[s]["docs"] for m in metas) for s in SPLITS},
                        rejected=dict(sorted(rejected.items())), inputs=len(files), config=to_dict(cfg))
    manifest.root = out
    manifest.save()
    if not cfg.keep_work:
        storage.remove(storage.join(out, "_work"), recursive=True)
    if rejected:
        log.warning("rejected %d records (%s); samples in %s", sum(rejected.values()),
                    ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())), storage.join(out, "rejected"))
    log.info("tokenized in %.0f s: %d train / %d val tokens (%d / %d documents)", time.perf_counter() - t0,
             manifest.num_tokens("train"), manifest.num_tokens("val"), manifest.docs["train"], manifest.docs["val"])
    return manifest
