"""The tokenize stage: raw text files -> fixed-size token shards + manifest, with Ray Data.

Each Ray Data task is a group of input files (one file, or many small ones): an actor of the pool
(tokenizer loaded once) parses their records, rejects bad ones, tokenizes, appends end-of-text after
each document, splits documents train/val by a hash of their text, and writes the task's token arrays
under `<output>/_work/`. The driver then packs those, in sorted input order, into `train_%06d.bin` /
`val_%06d.bin` shards, lists every input file with its split and token counts in `files.jsonl` (and
sums them in `corpus.json`) beside them, and writes `manifest.json` last. With `corpus=python` the
inputs are the `.py` files of the standard library and site-packages (or of the given directories),
de-duplicated by content hash; each file is one document, so a file lies wholly in one split, chosen
by the same content hash. Every file is written atomically and finished work is
skipped when the job runs again, so an interrupted run resumes without loss or duplication.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sysconfig
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

    corpus: Literal["files", "python"] = "files"  # files: the inputs; python: the .py files under the inputs
    inputs: list[str] = field(default_factory=list)  # globs/paths, local or s3:// (.jsonl, .parquet, else text); python: dirs (none: stdlib, site-packages)
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
    files_per_task: int = 0  # input files per Ray Data task; 0 = 1 for the files corpus, 256 for python's small files
    actor_cpus: float = 0.5  # CPUs per actor (fractional: leave room for Ray Data's read tasks)
    max_rejected_samples: int = 100  # bad records kept in rejected/rejected.jsonl
    keep_work: bool = False  # keep the per-file intermediate arrays in _work/

    def validate(self) -> None:
        if not self.inputs and self.corpus == "files":
            raise ConfigError("inputs: give at least one file or glob")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1 or self.num_actors < 1 or self.vocab_size < 300 or self.files_per_task < 0:
            raise ConfigError("shard_tokens and num_actors must be >= 1, vocab_size >= 300, files_per_task >= 0")


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


def content_hash(data: bytes) -> int:
    """A stable 64-bit hash of some bytes (splits documents and de-duplicates source files)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def split_of(text: str, val_fraction: float) -> str:
    """`val` for a stable `val_fraction` share of documents (by text hash), else `train`."""
    return "val" if content_hash(text.encode()) < val_fraction * 2**64 else "train"


# ---------------------------------------------------------------- the Ray Data stage

def _work_paths(output: str, index: int) -> dict[str, str]:
    base = storage.join(output, "_work", f"{index:06d}")
    return {"train": base + ".train.bin", "val": base + ".val.bin", "meta": base + ".json"}


class TokenizeFiles:
    """Ray Data actor: tokenizes a task's input files, writes their per-split arrays to `_work/`."""

    def __init__(self, tokenizer_path: str, cfg: dict[str, Any]):
        self.tok = load_tokenizer(tokenizer_path)
        self.eot = eot_id(self.tok)
        self.dtype = token_dtype(self.tok.get_vocab_size())
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        metas = [self._task(json.loads(str(p)), int(i)) for p, i in zip(batch["paths"], batch["index"])]
        return {"meta": np.array([json.dumps(m) for m in metas])}

    def _task(self, paths: list[str], index: int) -> dict[str, Any]:
        out = _work_paths(self.cfg["output"], index)
        if storage.exists(out["meta"]):  # finished in an earlier, interrupted run
            return storage.read_json(out["meta"])
        docs: dict[str, list[str]] = {s: [] for s in SPLITS}
        owner: dict[str, list[int]] = {s: [] for s in SPLITS}  # the file (position in `paths`) of each document
        files = [{"path": p, "train": 0, "val": 0, "rejected": 0} for p in paths]
        rejects: list[dict] = []
        for k, path in enumerate(paths):
            for text, rej in iter_records(path, self.cfg["text_field"], self.cfg["text_unit"]):
                if rej is not None:
                    rejects.append(rej)
                    files[k]["rejected"] += 1
                    continue
                if self.cfg["split"] == "tail":  # nanoGPT's split: the head trains, the tail validates
                    cut = round(len(text) * (1 - self.cfg["val_fraction"]))
                    pieces = {"train": text[:cut], "val": text[cut:]}
                else:
                    pieces = {split_of(text, self.cfg["val_fraction"]): text}
                for split, piece in pieces.items():
                    docs[split].append(piece)
                    owner[split].append(k)
        meta: dict[str, Any] = {"index": index, "rejected": dict(Counter(r["reason"] for r in rejects)),
                                "rejected_samples": rejects[: self.cfg["max_rejected_samples"]], "files": files}
        for split in SPLITS:
            ids = [e.ids + [self.eot] for e in self.tok.encode_batch(docs[split])] if docs[split] else []
            for k, doc in zip(owner[split], ids):
                files[k][split] += len(doc)
            tokens = np.fromiter((t for doc in ids for t in doc), dtype=self.dtype)
            storage.write_bytes(out[split], encode_shard(tokens))
            meta[split] = {"docs": len(docs[split]), "tokens": int(len(tokens))}
        storage.write_json(out["meta"], meta)  # last: marks this task done
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


def python_roots() -> list[str]:
    """This interpreter's standard library and site-packages directories (none nested in another)."""
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[k]) for k in ("stdlib", "purelib", "platlib") if os.path.isdir(paths.get(k, ""))}
    return sorted(r for r in roots if not any(r.startswith(o + os.sep) for o in roots))


def check_roots(roots: list[str]) -> list[str]:
    """The roots of a python corpus as absolute local directories; InputError for anything else."""
    out = []
    for root in roots:
        if storage.is_s3(root) or not os.path.isdir(root):
            raise InputError(f"python corpus root {root!r} is not a local directory")
        out.append(os.path.realpath(root))
    return out


def collect_python_files(roots: list[str]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The `.py` files under `roots`, in sorted path order, one per distinct content (the first path
    wins): `[{"path", "hash"}]`, and counts of what was found, duplicated and unreadable."""
    paths = sorted({os.path.join(d, n) for r in roots for d, _, names in os.walk(r) for n in names if n.endswith(".py")})
    seen: set[int] = set()
    files, stats = [], Counter(found=len(paths), found_bytes=0, duplicates=0, duplicate_bytes=0, unreadable=0)
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:  # a broken link, a file removed meanwhile, no permission
            stats["unreadable"] += 1
            continue
        h = content_hash(data)
        stats["found_bytes"] += len(data)
        if h in seen:
            stats["duplicates"] += 1
            stats["duplicate_bytes"] += len(data)
            continue
        seen.add(h)
        files.append({"path": path, "hash": f"{h:016x}"})
    return files, dict(stats)


def corpus_files(cfg: TokenizeConfig) -> tuple[list[str], dict[str, Any]]:
    """The input files of a corpus and what to record of each beyond its counts (python: its hash),
    plus a summary of how they were found."""
    if cfg.corpus == "files":
        files = resolve_inputs(cfg.inputs)
        return files, {"corpus": "files", "extra": {}}
    roots = check_roots(cfg.inputs) if cfg.inputs else python_roots()
    found, stats = collect_python_files(roots)
    if not found:
        raise InputError(f"no .py file under {', '.join(roots)}")
    return [f["path"] for f in found], {"corpus": "python", "roots": roots, **stats,
                                         "extra": {f["path"]: {"hash": f["hash"]} for f in found}}


def _tasks(cfg: TokenizeConfig, files: list[str]) -> list[list[str]]:
    """The input files in groups of consecutive files, one group per Ray Data task."""
    n = cfg.files_per_task or (256 if cfg.corpus == "python" else 1)
    return [files[i:i + n] for i in range(0, len(files), n)]


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


def _tokenize_files(cfg: TokenizeConfig, tasks: list[list[str]], out: str, tokenizer_path: str) -> list[dict]:
    import ray

    items = [{"paths": json.dumps(paths), "index": i} for i, paths in enumerate(tasks)]
    worker_cfg = {**to_dict(cfg), "output": out}
    ds = ray.data.from_items(items).map_batches(
        TokenizeFiles, fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "cfg": worker_cfg},
        batch_size=1, num_cpus=cfg.actor_cpus, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors))
    progress = Progress(log, "tokenize", len(tasks), "tasks")
    metas = []
    for row in ds.iter_rows():
        metas.append(json.loads(row["meta"]))
        progress.update()
    return sorted(metas, key=lambda m: m["index"])


def _file_split(row: dict[str, Any]) -> str:
    """Where a file's tokens went: one split, `mixed`, or `none` (all its records rejected or empty)."""
    used = [s for s in SPLITS if row[s]]
    return used[0] if len(used) == 1 else "mixed" if used else "none"


def write_file_list(out: str, metas: list[dict], found: dict[str, Any]) -> dict[str, Any]:
    """Write `files.jsonl` (each input file: path, split, tokens, rejected records, and the corpus's
    extra fields) and `corpus.json` (how the files were found, files and tokens per split); returns the latter."""
    rows = [{**f, **found["extra"].get(f["path"], {}), "split": _file_split(f)} for m in metas for f in m["files"]]
    storage.write_text(storage.join(out, "files.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    summary = {k: v for k, v in found.items() if k != "extra"}
    summary["files"] = dict(sorted(Counter(r["split"] for r in rows).items()))
    summary["tokens"] = {s: sum(r[s] for r in rows) for s in SPLITS}
    storage.write_json(storage.join(out, "corpus.json"), summary)
    return summary


def _pack(out: str, split: str, tasks: int, shard_tokens: int, dtype: np.dtype) -> list[dict[str, Any]]:
    """Concatenate the per-task arrays of a split into full shards (the last may be partial)."""
    infos, buf, n = [], [], 0
    progress = Progress(log, f"packing {split}", tasks, "tasks")

    def flush(tokens: np.ndarray) -> None:
        name = f"{split}_{len(infos):06d}.bin"
        path = storage.join(out, name)
        data = encode_shard(tokens)
        if not (storage.exists(path) and storage.size(path) == len(data)):  # skip shards an earlier run wrote
            storage.write_bytes(path, data)
        infos.append({"file": name, "n_tokens": int(len(tokens)), "sha256": hashlib.sha256(data).hexdigest()})

    for i in range(tasks):
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
    files, found = corpus_files(cfg)
    log.info("tokenizing %d files into %s", len(files), out)
    tokenizer_path = _prepare_tokenizer(cfg, files, out)
    tok = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tok.get_vocab_size())
    tasks = _tasks(cfg, files)
    metas = _tokenize_files(cfg, tasks, out, tokenizer_path)
    write_file_list(out, metas, found)

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
                        shards={s: _pack(out, s, len(tasks), cfg.shard_tokens, dtype) for s in SPLITS},
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
