"""The serving configuration: one dataclass that `spotlm serve`, the Ray Serve app builder
(`app.serve.deployment:build_app`) and serve_config.yaml's `args:` all read, and the checks run
before any Ray work."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Literal

from app.config import ConfigError

API_KEY_ENV = "SPOTLM_API_KEY"  # the bearer token of replicas whose api_key is not set


@dataclass
class ServeConfig:
    """Serve an exported model over an OpenAI-compatible HTTP API (Ray Serve)."""

    model: str = "runs/quickstart/export"  # exported model directory, local or s3://
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when the replica sees a GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    cuda_graphs: bool = True  # on CUDA, replay decode steps as CUDA graphs (false: eager, the reference path)
    max_prompt_tokens: int = 2048  # longer prompts get a 400 (also capped by the model's context)
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_n: int = 16  # the most sequences one request may ask for (prompts x n)
    request_timeout_s: float = 60.0  # per request, waiting for a slot included (504 after)
    max_batch: int = 32  # sequences decoded together (KV cache slots per replica)
    max_queue: int = 256  # sequences waiting for a slot; beyond: 429 + Retry-After
    max_prefill_tokens: int = 4096  # padded prompt tokens prefilled in one forward
    api_key: str | None = None  # bearer token for the /v1 routes; none = env SPOTLM_API_KEY, unset = no auth
    index: str | None = None  # dataset dir with the LMatch index (models with lmatch_vocab > 0)
    knn_index: str | None = None  # kNN-LM index dir (index/knn.py); none = off
    knn_lambda: float = 0.25  # p = lambda p_knn + (1 - lambda) p_lm
    knn_k: int = 16  # neighbours per token (1-1024)
    knn_temperature: float = 1.0  # p_knn = softmax(-distance / knn_temperature)
    draft_tokens: int = 0  # speculative decoding: drafts per step from --index and the prompt (0 = off)
    max_draft: int = 8  # the most drafts one step verifies (a request may ask for up to this many)
    prompt_lookup: bool = True  # with draft_tokens: also draft from the request's own text
    prefix_cache_tokens: int = 0  # prompt positions whose KV is kept for requests sharing a prefix (0 = off)
    kv_bucket: int = 64  # the fewest cached positions attention reads per step (0 = always the whole cache)
    quantize: Literal["none", "int8", "fp8"] = "none"  # weight-only 8-bit linears (fp8: Ada/Hopper GPUs)
    quantize_head: bool = False  # also the output layer (a tied one gets its own 8-bit copy)
    num_replicas: int = 1  # fixed replica count (when autoscaling is off)
    autoscaling: bool = False  # scale between min_replicas and max_replicas on ongoing requests
    min_replicas: int = 1  # autoscaling's floor
    max_replicas: int = 4  # autoscaling's ceiling
    target_ongoing_requests: float = 16.0  # per replica, for the autoscaler; keep it under max_batch
    num_cpus: float = 1.0  # CPUs per replica
    num_gpus: float = 0.0  # GPUs per replica (a fraction shares one: 0.5 = two replicas per GPU)

    def validate(self) -> None:
        """ConfigError, in one line, for a value out of range or an impossible mix (reads no file)."""
        for name, low in (("max_prompt_tokens", 1), ("max_tokens_limit", 1), ("max_n", 1), ("max_batch", 1),
                          ("max_queue", 0), ("max_prefill_tokens", 1), ("knn_k", 1), ("num_replicas", 1),
                          ("min_replicas", 0), ("max_replicas", 1), ("num_cpus", 0), ("num_gpus", 0),
                          ("draft_tokens", 0), ("max_draft", 0), ("prefix_cache_tokens", 0), ("kv_bucket", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= {low}")
        for name in ("request_timeout_s", "knn_temperature", "target_ongoing_requests"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 <= self.knn_lambda <= 1:
            raise ConfigError(f"knn_lambda={self.knn_lambda} must be in [0, 1]")
        if self.knn_k > 1024:
            raise ConfigError(f"knn_k={self.knn_k} must be <= 1024")
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ConfigError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        self._validate_decoding()

    def _validate_decoding(self) -> None:
        """The speculative-decoding and prefix-cache mixes that cannot run."""
        if self.draft_tokens > self.max_draft:
            raise ConfigError(f"draft_tokens={self.draft_tokens} is more than max_draft={self.max_draft}")
        if 0 < self.prefix_cache_tokens < 16:
            raise ConfigError(f"prefix_cache_tokens={self.prefix_cache_tokens}: the cache keeps blocks of 16 "
                              "tokens (0 = off)")
        if self.draft_tokens and self.knn_index:
            raise ConfigError("draft_tokens (speculative decoding) does not combine with knn_index")
        if self.draft_tokens and not (self.index or self.prompt_lookup):
            raise ConfigError("draft_tokens needs a source of drafts: index=<dataset dir> or prompt_lookup=true")

    def bearer_token(self) -> str | None:
        """The token /v1 requests must carry: api_key, else env SPOTLM_API_KEY, else None (no auth)."""
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None


@dataclass
class ServeJobConfig(ServeConfig):
    """Serve an exported model over an OpenAI-compatible HTTP API (Ray Serve) until stopped, or
    complete one --prompt and exit."""

    host: str = "127.0.0.1"  # listen address (0.0.0.0 accepts remote clients)
    port: int = 8000  # listen port
    prompt: str | None = None  # if given: complete it once, print the text, and exit
    max_tokens: int = 32  # tokens to complete --prompt with

    def validate(self) -> None:
        super().validate()
        if not 0 < self.port < 65536:
            raise ConfigError(f"port={self.port} is not a TCP port")
        if not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise ConfigError(f"max_tokens={self.max_tokens} must be in [1, max_tokens_limit={self.max_tokens_limit}]")

    def app_config(self) -> ServeConfig:
        """The Serve app's part of this config (without the command's own options)."""
        return ServeConfig(**{f.name: getattr(self, f.name) for f in fields(ServeConfig)})


def preflight(cfg: ServeConfig) -> None:
    """ConfigError, in one line, when the model is not a finished export, or an index it needs or is
    given is missing; reads only the small files that say so (no weights, no Ray)."""
    from app import storage
    from app.data.shards import load_manifest
    from app.model.export import CONFIG, TOKENIZER, WEIGHTS

    missing = [f for f in (CONFIG, WEIGHTS, TOKENIZER) if not storage.exists(storage.join(cfg.model, f))]
    if CONFIG in missing:
        raise ConfigError(f"{cfg.model}: no {CONFIG}: not a model export (or the export did not finish)")
    if missing:
        raise ConfigError(f"{cfg.model}: the export has no {', '.join(missing)}")
    lmatch_vocab = _export_lmatch_vocab(storage.join(cfg.model, CONFIG))
    if lmatch_vocab and not cfg.index:
        raise ConfigError(f"{cfg.model}: this model reads retrieval-match ids (lmatch_vocab={lmatch_vocab}): "
                          f"give its dataset's LMatch index with --index=<dataset dir>")
    if cfg.index:
        try:
            manifest = load_manifest(cfg.index)
        except ValueError as e:
            raise ConfigError(f"--index: {e}") from None
        if not manifest.extras.get("lmatch"):
            raise ConfigError(f"--index: {cfg.index} has no LMatch index; run "
                              f"`python -m jobs.build_index --data={cfg.index}` first")
    if cfg.knn_index:
        from index.knn import META  # lazily: FAISS loads only for servers with a kNN index

        if not storage.exists(storage.join(cfg.knn_index, META)):
            raise ConfigError(f"--knn_index: {cfg.knn_index}: no {META}: not a kNN index (or its build did not "
                              "finish)")


def _export_lmatch_vocab(config_path: str) -> int:
    """The export's `lmatch_vocab` (its config.json's spotlm section, app/model/export.py)."""
    from app import storage

    try:
        return int(storage.read_json(config_path)["spotlm"]["model"].get("lmatch_vocab") or 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{config_path} is not a spotlm export config (no 'spotlm' section)") from None
