"""Evaluate a model's loss / perplexity on a split, plain and with its retrieval indexes (LMatch ids,
kNN-LM interpolation, both), or on standard tasks (HellaSwag, LAMBADA: `app.indexing.tasks`); also the
shared pieces of the kNN build: loading a model from an export or a run dir, capturing final hidden
states, and the lmatch ids aligned with a split.

Every number is a token-weighted mean over the same fixed windows `app.data.loader.eval_batches` gives
(non-overlapping windows of `seq_len` + 1 tokens from the start of the split), so the plain loss is
exactly the model's mean cross-entropy there (over its padded vocabulary, as in training).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import torch

from app import storage
from app.config import ConfigError, from_dict, to_dict
from app.data.loader import TokenStream, eval_batches, match_stream
from app.log import get_logger
from app.model.gpt import GPT, ModelConfig
from app.data.shards import load_manifest

log = get_logger(__name__)


# ---------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A model ready for inference, with where it came from."""

    model: GPT
    config: ModelConfig
    source: str  # the export dir or checkpoint dir it was loaded from
    kind: str  # export | checkpoint
    sha256: str  # of the weights file (model.safetensors / model.pt)
    tokenizer: str  # its tokenizer.json: the export's, or a checkpoint's dataset's
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256, "step": self.meta.get("step"),
                "params": self.model.num_params(), "config": to_dict(self.config)}


def resolve_model(path: str) -> tuple[str, str]:
    """(kind, directory) for an export dir, or a run dir: its export if finished, else its newest complete
    checkpoint. FileNotFoundError naming the path otherwise."""
    path = storage.absolute(path)
    if storage.exists(storage.join(path, "config.json")):
        return "export", path
    if storage.exists(storage.join(path, "export", "config.json")):
        return "export", storage.join(path, "export")
    from app.train.checkpoint import DONE

    try:
        done = sorted(f.rsplit("/", 1)[0] for f in storage.list_files(path) if f.endswith("/" + DONE)
                      and os.path.basename(f.rsplit("/", 1)[0]).startswith("checkpoint_"))
    except (FileNotFoundError, OSError):
        done = []
    if done:
        return "checkpoint", done[-1]
    raise FileNotFoundError(f"{path}: no model here: neither an export (config.json) nor a run dir with an "
                            "export/ or a complete checkpoint_*/")


def _sha256(path: str) -> str:
    with open(storage.local_path(path), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_model(path: str, device: str = "cpu", data: str | None = None) -> LoadedModel:
    """Load an export, or a run dir's export / newest checkpoint (its ModelConfig from the run's config and
    the dataset's vocabulary: `data` overrides the run's dataset), in eval mode, float32."""
    kind, src = resolve_model(path)
    if kind == "export":
        from app.model.export import TOKENIZER, WEIGHTS, load_exported

        ex = load_exported(src, device=device, dtype=torch.float32)
        return LoadedModel(ex.model, ex.config, src, kind, _sha256(storage.join(src, WEIGHTS)),
                           storage.join(src, TOKENIZER), ex.meta)
    from app.train.config import TrainConfig, model_config

    local = storage.local_dir(src)
    state = storage.read_json(os.path.join(local, "state.json"))
    tcfg = from_dict(TrainConfig, state.get("config", {}))
    manifest = load_manifest(data or tcfg.data)
    cfg = model_config(tcfg, manifest.vocab_size)
    model = GPT(cfg)
    sd = torch.load(os.path.join(local, "model.pt"), map_location="cpu")
    model.load_state_dict({k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()})
    model.to(device=device, dtype=torch.float32).eval()
    return LoadedModel(model, cfg, src, kind, _sha256(os.path.join(local, "model.pt")), manifest.tokenizer_path,
                       {"step": state.get("step")})


def pick_device(spec: str = "auto") -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


@contextlib.contextmanager
def final_hidden(model: GPT) -> Iterator[list[torch.Tensor]]:
    """While open, every forward appends its final hidden state (the output of `model.model.norm`, the
    input of `lm_head`, [B, T, d]) to the yielded list."""
    got: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_hook(lambda mod, args, out: got.append(out))
    try:
        yield got
    finally:
        handle.remove()


# ---------------------------------------------------------------- lmatch ids


def none_lmatch(cfg: ModelConfig, like: torch.Tensor) -> torch.Tensor:
    """All-"no match" ids (vocab_size) shaped like `like`: a model with an lmatch table evaluated without it."""
    return torch.full_like(like, cfg.vocab_size)


# ---------------------------------------------------------------- forward pieces


@torch.no_grad()
def positions_forward(model: GPT, inputs: torch.Tensor, targets: torch.Tensor | None,
                      lmatch: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One forward: (log p_LM(target) [B*T] over the padded vocabulary as training scores it, or None without
    targets; final hidden states [B*T, d] float32)."""
    with final_hidden(model) as got:
        logits, _ = model(inputs, lmatch=lmatch)
    hidden = got[-1].float().flatten(0, 1)
    if targets is None:
        return None, hidden
    logp = torch.log_softmax(logits.float().flatten(0, 1), dim=-1)
    return logp.gather(1, targets.flatten()[:, None]).squeeze(1), hidden


def embed_windows(model: GPT, stream: TokenStream, match: TokenStream | None, windows: list[tuple[int, int]],
                  batch: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values of the kNN datastore for `windows` [(start, length)]: the final hidden state at each
    position (float32 [n, d]) and the token after it (int32 [n]). Equal-length windows are batched."""
    cfg = model.cfg
    keys, values = [], []
    i = 0
    while i < len(windows):
        length = windows[i][1]
        j = i
        while j < len(windows) and j - i < batch and windows[j][1] == length:
            j += 1
        data = torch.from_numpy(np.stack([stream.read(s, length + 1) for s, _ in windows[i:j]]))
        x, y = data[:, :-1].to(device), data[:, 1:]
        ids = None
        if cfg.lmatch_vocab:
            ids = (torch.from_numpy(np.stack([match.read(s, length) for s, _ in windows[i:j]])) if match is not None
                   else none_lmatch(cfg, data[:, :-1])).to(device)
        _, hidden = positions_forward(model, x, None, ids)
        keys.append(hidden.cpu().numpy())
        values.append(y.flatten().numpy().astype(np.int32))
        i = j
    if not keys:
        return np.zeros((0, cfg.d_model), np.float32), np.zeros(0, np.int32)
    return np.concatenate(keys), np.concatenate(values)


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalConfig:
    """Evaluate a model on a split: plain, with LMatch ids, with kNN-LM interpolation, and both; or, with
    `tasks`, on standard evals scored as lm-evaluation-harness scores them."""

    model: str = "runs/spotlm-run/export"  # export dir, or a run dir (its export, else its newest checkpoint)
    data: str = "runs/shards"  # tokenized dataset dir (manifest.json), local or s3://; tasks: unused
    tasks: list[str] = field(default_factory=list)  # hellaswag,lambada: score these instead of the split's loss
    hellaswag: str = ""  # tasks: HellaSwag file, 6 lines per item (.txt or .txt.bz2)
    lambada: str = ""  # tasks: LAMBADA file, JSON lines of {"text": ...}
    limit: int = 0  # tasks: score the first N items of each; 0 = all
    split: Literal["train", "val"] = "val"  # which split to score
    max_tokens: int = 0  # score the first N tokens of the split; 0 = all of it
    seq_len: int = 0  # window length; 0 = the model's max_seq_len
    batch: int = 8  # windows (tasks: requests) per forward
    knn: str = "auto"  # kNN index dir; auto = <model>/knn when it exists; none = skip
    k: int = 16  # neighbours per position
    nprobe: int = 32  # IVF cells searched per query
    lambdas: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])  # kNN weights tried
    temperatures: list[float] = field(default_factory=lambda: [1.0])  # softmax temperatures of -distance tried
    lmatch: Literal["auto", "off"] = "auto"  # auto: use the dataset's LMatch ids when the model has a table
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if available
    output: str = ""  # also write the JSON result to this file (local or s3://)
    tensorboard: str = ""  # also write the results as TensorBoard scalars into this directory ("" = no)

    def validate(self) -> None:
        if self.batch < 1 or self.k < 1 or self.max_tokens < 0 or self.seq_len < 0 or self.limit < 0:
            raise ConfigError("batch and k must be >= 1; max_tokens, seq_len and limit >= 0")
        from app.indexing.tasks import TASKS

        for task in self.tasks:
            if task not in TASKS:
                raise ConfigError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
            if not getattr(self, task):
                raise ConfigError(f"--tasks={task} needs --{task}=PATH (its data file)")
        if any(not 0 < lam < 1 for lam in self.lambdas) or not self.lambdas:
            raise ConfigError(f"lambdas must be in (0, 1), got {self.lambdas}")
        if any(t <= 0 for t in self.temperatures) or not self.temperatures:
            raise ConfigError(f"temperatures must be > 0, got {self.temperatures}")


def resolve_knn(spec: str, model_path: str) -> str | None:
    """The kNN index directory to use, or None: "none"/"" = none, "auto" = <model>/knn (or the run dir's /knn)
    when it holds a finished index."""
    if spec in ("", "none"):
        return None
    if spec != "auto":
        return storage.absolute(spec)
    for cand in (storage.join(storage.absolute(model_path), "knn"),):
        if os.path.exists(os.path.join(cand, "meta.json")):
            return cand
    return None


class _Tally:
    """Token-weighted sums of -log p for the plain LM and every (temperature, lambda) of the kNN grid."""

    def __init__(self, temps: list[float], lams: list[float]):
        self.temps, self.lams = temps, lams
        self.n, self.lm = 0, 0.0
        self.grid = np.zeros((len(temps), len(lams)))
        self.knn_only = np.zeros(len(temps))  # lambda = 1 (kNN alone; inf when a target is never retrieved)
        self.hits = 0  # positions whose target is the next token of at least one neighbour

    def add_lm(self, lm_lp: torch.Tensor) -> None:
        self.n += lm_lp.numel()
        self.lm -= lm_lp.double().sum().item()

    def add_knn(self, lm_lp: torch.Tensor, dist: np.ndarray, next_ids: np.ndarray, targets: torch.Tensor) -> None:
        from index.knn import interpolate, knn_target_logprob

        found = torch.from_numpy(next_ids >= 0).any(dim=1)  # positions with no neighbour keep the LM
        self.hits += int((torch.from_numpy(next_ids) == targets[:, None]).any(dim=1).sum())
        for a, t in enumerate(self.temps):
            kn = knn_target_logprob(dist, next_ids, targets, t)
            self.knn_only[a] -= kn.double().sum().item()
            for b, lam in enumerate(self.lams):
                mixed = torch.where(found, interpolate(lm_lp, kn, lam), lm_lp)
                self.grid[a, b] -= mixed.double().sum().item()


def _stats(nll_sum: float, n: int) -> dict[str, float | None]:
    """Loss and perplexity; None where infinite (kNN alone never retrieved some target), so the JSON is standard."""
    loss = nll_sum / max(n, 1)
    finite = math.isfinite(loss)
    return {"loss": loss if finite else None, "ppl": math.exp(loss) if finite and loss < 700 else None, "tokens": n}


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """The JSON-able result: per variant ("lm", "lmatch", "knn", "lmatch+knn") loss, perplexity, tokens; kNN
    variants add the best (lambda, temperature) and the whole curve."""
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    manifest = load_manifest(cfg.data)
    if not manifest.shards.get(cfg.split):
        raise ValueError(f"{manifest.root}: split {cfg.split!r} has no shards")
    lm = load_model(cfg.model, device, data=cfg.data)
    mcfg = lm.config
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
    stream = TokenStream(manifest, cfg.split)
    match = match_stream(manifest, cfg.split) if cfg.lmatch == "auto" else None
    notes: list[str] = []

    # ---- which variants: (name, lmatch ids: None | "none" | "ids") ----
    variants: list[tuple[str, str | None]] = []
    if mcfg.lmatch_vocab:
        variants.append(("lm", "none"))
        notes.append("the model has an lmatch table: 'lm' is scored with all-NONE lmatch ids")
        if match is not None:
            variants.append(("lmatch", "ids"))
        else:
            notes.append(f"no lmatch ids for split {cfg.split!r} in the dataset (or lmatch=off): no 'lmatch' variant")
    else:
        variants.append(("lm", None))
        if match is not None:
            notes.append("the dataset has lmatch ids but the model has no lmatch table: they are not used")

    # ---- the kNN index ----
    knn_path = resolve_knn(cfg.knn, cfg.model)
    index = None
    knn_info: dict[str, Any] = {}
    if knn_path:
        from index.knn import KnnIndex

        index = KnnIndex.open(knn_path, nprobe=cfg.nprobe)
        if index.d != mcfg.d_model:
            raise ValueError(f"{knn_path}: keys have {index.d} dims, the model's hidden states {mcfg.d_model}")
        built_for = index.meta.get("model", {}).get("sha256")
        knn_info = {"path": knn_path, "n": index.n, "kind": index.meta["kind"], "nlist": index.meta.get("nlist"),
                    "m": index.meta.get("m"), "metric": index.metric, "k": cfg.k, "nprobe": index.nprobe,
                    "same_model": built_for == lm.sha256}
        if built_for != lm.sha256:
            notes.append("the kNN index was built with other weights than this model's")
            log.warning("%s was built for model sha256 %s, this one is %s", knn_path, built_for, lm.sha256)

    if index is not None and mcfg.lmatch_vocab:
        built = index.meta.get("lmatch")
        notes.append(f"the kNN keys were computed with lmatch ids = {built!r}: the variant scored the same way "
                     f"({'lmatch+knn' if built == 'ids' else 'knn'}) is the consistent one")

    # ---- one pass per variant ----
    batches = eval_batches(stream, seq_len, cfg.batch, cfg.max_tokens, 0, 1, match=match)
    if not batches:
        raise ValueError(f"split {cfg.split!r} has {stream.n_tokens} tokens: too few for one window of {seq_len}")
    results: dict[str, Any] = {}
    for name, ids_mode in variants:
        tally = _Tally(cfg.temperatures, cfg.lambdas)
        for b in batches:
            x = b.inputs.to(device)
            ids = None
            if ids_mode == "none":
                ids = none_lmatch(mcfg, b.inputs).to(device)
            elif ids_mode == "ids":
                ids = b.lmatch.to(device)
            lm_lp, hidden = positions_forward(lm.model, x, b.targets.to(device), ids)
            lm_lp = lm_lp.cpu()
            tally.add_lm(lm_lp)
            if index is not None:
                dist, next_ids = index.search(hidden.cpu().numpy(), cfg.k)
                tally.add_knn(lm_lp, dist, next_ids, b.targets.flatten())
        results[name] = _stats(tally.lm, tally.n)
        if index is not None:
            curve = [{"lambda": lam, "temperature": t, **_stats(tally.grid[a, j], tally.n)}
                     for a, t in enumerate(tally.temps) for j, lam in enumerate(tally.lams)]
            best = min(curve, key=lambda c: c["loss"])
            knn_alone = [{"temperature": t, **_stats(tally.knn_only[a], tally.n)} for a, t in enumerate(tally.temps)]
            results["knn" if name == "lm" else f"{name}+knn"] = {
                **{k: best[k] for k in ("loss", "ppl", "tokens")}, "lambda": best["lambda"],
                "temperature": best["temperature"], "gain": results[name]["loss"] - best["loss"],
                "target_in_neighbours": tally.hits / max(tally.n, 1),
                "curve": curve, "knn_only": knn_alone}
    return {"model": lm.describe(), "data": manifest.root, "split": cfg.split,
            "seq_len": seq_len, "tokens": results["lm"]["tokens"], "device": device, "knn_index": knn_info or None,
            "results": results, "notes": notes, "seconds": round(time.perf_counter() - t0, 3)}


def evaluate_tasks(cfg: EvalConfig) -> dict[str, Any]:
    """The JSON-able result of `cfg.tasks` (lm_eval's results block: per task its metrics and item count), with
    the model and the device. A checkpoint's vocabulary and tokenizer are its run's dataset's."""
    from app.data.tokenizer import load_tokenizer
    from app.indexing.tasks import run_tasks

    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    lm = load_model(cfg.model, device)
    notes = []
    if lm.config.lmatch_vocab:
        notes.append("the model has an lmatch table: scored with all-NONE lmatch ids (free text has no LMatch ids)")
    paths = {task: getattr(cfg, task) for task in cfg.tasks}
    results = run_tasks(lm.model, load_tokenizer(lm.tokenizer), cfg.tasks, paths, cfg.limit, cfg.batch, device)
    return {**results, "n": {task: r["n"] for task, r in results.items()}, "model": lm.describe(),
            "device": device, "max_length": lm.config.max_seq_len, "notes": notes,
            "seconds": round(time.perf_counter() - t0, 3)}
