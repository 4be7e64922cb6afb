"""Ray job: serve an exported model with Ray Serve (OpenAI-style /v1/completions on host:port).

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
    num_replicas: int = 1
    num_gpus: float = 0.0  # GPUs per replica (fractions share a GPU)
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    request_timeout_s: float = 60.0  # per request; slower ones get a 504
    prompt: str | None = None  # if given: complete it once, print the text, and exit
    max_tokens: int = 32  # for --prompt

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"ServeConfig: port={self.port} is not a TCP port")
        if self.num_replicas < 1 or self.num_gpus < 0:
            raise ConfigError("ServeConfig: num_replicas must be >= 1 and num_gpus >= 0")
        if min(self.max_tokens, self.max_tokens_limit) < 1 or self.request_timeout_s <= 0:
            raise ConfigError("ServeConfig: max_tokens, max_tokens_limit and request_timeout_s must be positive")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv)
    from ray import serve

    from app import serve as app_serve

    init_ray()
    args = app_serve.ServeArgs(model=cfg.model, device=cfg.device, num_replicas=cfg.num_replicas,
                               num_gpus=cfg.num_gpus, max_tokens_limit=cfg.max_tokens_limit,
                               request_timeout_s=cfg.request_timeout_s)
    try:
        url = app_serve.start(args, cfg.host, cfg.port)
    except (FileNotFoundError, RuntimeError) as e:  # no export; or a broken one (the replica log says why)
        print(f"serve: could not start: {e}", file=sys.stderr)
        return 1
    if cfg.prompt is not None:
        try:
            reply = app_serve.post_json(f"{url}/v1/completions", {"prompt": cfg.prompt, "max_tokens": cfg.max_tokens})
        except RuntimeError as e:  # the server refused the prompt: say why
            print(f"serve: {e}", file=sys.stderr)
            return 1
        finally:
            serve.delete(app_serve.APP_NAME)
        print(reply["choices"][0]["text"])
        return 0
    print(f"serving {cfg.model} at {url}/v1/completions (Ctrl-C stops)")
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
