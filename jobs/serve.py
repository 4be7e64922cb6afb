"""Ray job: serve an exported model with Ray Serve (OpenAI-compatible /v1/completions and /v1/chat/completions).

    python -m jobs.serve --model=runs/my-run/export [--port=8000] [--prompt="Once upon"]
"""
from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import Literal

from app.config import ConfigError, parse_config
from app.ray_env import init_ray


@dataclass
class ServeConfig:
    """Serve an exported model."""

    model: str = "runs/quickstart/runs/quickstart/export"  # exported model directory, local or s3://
    host: str = "127.0.0.1"  # listen address (0.0.0.0 to accept remote clients)
    port: int = 8000
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when the replica sees a GPU
    num_replicas: int = 1  # fixed replica count (when autoscaling is off)
    autoscaling: bool = False  # scale replicas between min_replicas and max_replicas
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 16.0  # per replica, for the autoscaler
    num_gpus: float = 0.0  # GPUs per replica (fractions share a GPU)
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    request_timeout_s: float = 60.0  # per request; slower ones get a 504
    max_batch: int = 32  # sequences decoded together per replica (KV cache slots)
    max_queue: int = 256  # sequences waiting for a slot; beyond: 429 + Retry-After
    api_key: str | None = None  # bearer token for /v1 (None: env SPOTLM_API_KEY on the replicas, unset = open)
    index: str | None = None  # LMatch index dataset dir (models with lmatch_vocab > 0)
    knn_index: str | None = None  # kNN-LM index dir; None = off
    knn_lambda: float = 0.25  # p = lambda p_knn + (1 - lambda) p_lm
    prompt: str | None = None  # if given: complete it once, print the text, and exit
    max_tokens: int = 32  # for --prompt

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"ServeConfig: port={self.port} is not a TCP port")
        if self.num_replicas < 1 or self.num_gpus < 0:
            raise ConfigError("ServeConfig: num_replicas must be >= 1 and num_gpus >= 0")
        if self.max_batch < 1 or self.max_queue < 0:
            raise ConfigError("ServeConfig: max_batch must be >= 1 and max_queue >= 0")
        if self.autoscaling and not 0 <= self.min_replicas <= self.max_replicas:
            raise ConfigError("ServeConfig: autoscaling needs 0 <= min_replicas <= max_replicas")
        if not 0 <= self.knn_lambda <= 1:
            raise ConfigError("ServeConfig: knn_lambda must be in [0, 1]")
        if min(self.max_tokens, self.max_tokens_limit) < 1 or self.request_timeout_s <= 0:
            raise ConfigError("ServeConfig: max_tokens, max_tokens_limit and request_timeout_s must be positive")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv)
    from ray import serve

    from app.serve import deployment as app_serve

    init_ray()
    args = app_serve.ServeArgs(**{k: getattr(cfg, k) for k in (
        "model", "device", "num_replicas", "autoscaling", "min_replicas", "max_replicas", "target_ongoing_requests",
        "num_gpus", "max_tokens_limit", "request_timeout_s", "max_batch", "max_queue", "api_key", "index",
        "knn_index", "knn_lambda")})
    try:
        url = app_serve.start(args, cfg.host, cfg.port)
    except (FileNotFoundError, RuntimeError) as e:  # no export; or a broken one (the replica log says why)
        print(f"serve: could not start: {e}", file=sys.stderr)
        return 1
    if cfg.prompt is not None:
        try:
            reply = app_serve.post_json(f"{url}/v1/completions", {"prompt": cfg.prompt, "max_tokens": cfg.max_tokens},
                                        api_key=cfg.api_key)
        except RuntimeError as e:  # the server refused the prompt: say why
            print(f"serve: {e}", file=sys.stderr)
            return 1
        finally:
            serve.delete(app_serve.APP_NAME)
        print(reply["choices"][0]["text"])
        return 0
    print(f"serving {cfg.model} at {url}/v1 (completions, chat/completions; Ctrl-C stops)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.delete(app_serve.APP_NAME)  # only our app: on a shared cluster other Serve apps keep running
    return 0


if __name__ == "__main__":
    sys.exit(main())
