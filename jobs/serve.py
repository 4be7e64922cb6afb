"""Ray job: serve an exported model with Ray Serve (OpenAI-style /v1/completions on host:port).

    python -m jobs.serve --model=runs/my-run/export [--port=8000] [--prompt="Once upon"]
"""
from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass

from app.config import parse_config
from app.ray_env import init_ray


@dataclass
class ServeConfig:
    """Serve an exported model."""

    model: str = "runs/quickstart/runs/quickstart/export"  # exported model directory, local or s3://
    host: str = "127.0.0.1"  # listen address (0.0.0.0 to accept remote clients)
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda
    num_replicas: int = 1
    num_gpus: float = 0.0  # GPUs per replica (fractions share a GPU)
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    prompt: str | None = None  # if given: complete it once, print the text, and exit
    max_tokens: int = 32  # for --prompt


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv)
    from ray import serve

    from app import serve as app_serve

    init_ray()
    args = app_serve.ServeArgs(model=cfg.model, device=cfg.device, num_replicas=cfg.num_replicas,
                               num_gpus=cfg.num_gpus, max_tokens_limit=cfg.max_tokens_limit)
    try:
        url = app_serve.start(args, cfg.host, cfg.port)
    except Exception as e:  # a missing or broken export fails the deployment
        print(f"serve: could not start: {e}", file=sys.stderr)
        return 1
    if cfg.prompt is not None:
        try:
            reply = app_serve.post_json(f"{url}/v1/completions", {"prompt": cfg.prompt, "max_tokens": cfg.max_tokens})
            print(reply["choices"][0]["text"])
        finally:
            serve.shutdown()
        return 0
    print(f"serving {cfg.model} at {url}/v1/completions (Ctrl-C stops)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
