"""Ray job: serve an exported model with Ray Serve (OpenAI-compatible /v1/completions and /v1/chat/completions).

    spotlm serve --model=runs/my-run/export [--port=8000] [--prompt="Once upon"]
"""
from __future__ import annotations

import signal
import sys
import threading

from app.config import ConfigError, parse_config, refuse
from app.log import get_logger
from app.ray_env import init_ray
from app.serve.config import ServeJobConfig, preflight

log = get_logger("jobs.serve")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeJobConfig, argv, prog="serve")
    try:
        preflight(cfg)  # a missing export or index is refused here, before any Ray work
    except ConfigError as e:
        return refuse("serve", e)
    from ray import serve

    from app.serve import deployment

    init_ray()
    log.info("deploying %s on Ray Serve", cfg.model)
    try:
        url = deployment.start(cfg.app_config(), cfg.host, cfg.port)
        return complete_once(cfg, url) if cfg.prompt is not None else serve_until_stopped(cfg, url)
    except RuntimeError as e:  # the replica could not load the model, or the server refused the prompt
        print(f"serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: stop quietly
        return 130
    finally:
        serve.delete(deployment.APP_NAME)  # only our app: on a shared cluster other Serve apps keep running


def complete_once(cfg: ServeJobConfig, url: str) -> int:
    """Print the server's completion of cfg.prompt."""
    from app.serve.deployment import post_json

    reply = post_json(f"{url}/v1/completions", {"prompt": cfg.prompt, "max_tokens": cfg.max_tokens},
                      api_key=cfg.bearer_token())
    print(reply["choices"][0]["text"])
    return 0


def serve_until_stopped(cfg: ServeJobConfig, url: str) -> int:
    """Serve until SIGTERM or Ctrl-C."""
    print(f"serving {cfg.model} at {url}/v1 (completions, chat/completions; Ctrl-C stops)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
