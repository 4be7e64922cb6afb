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
    except RuntimeError as e:  # the replica could not load the model (its log says why)
        print(f"serve: could not start: {e}", file=sys.stderr)
        return 1
    if cfg.prompt is not None:
        try:
            reply = deployment.post_json(f"{url}/v1/completions", {"prompt": cfg.prompt, "max_tokens": cfg.max_tokens},
                                         api_key=cfg.bearer_token())
        except RuntimeError as e:  # the server refused the prompt: say why
            print(f"serve: {e}", file=sys.stderr)
            return 1
        finally:
            serve.delete(deployment.APP_NAME)
        print(reply["choices"][0]["text"])
        return 0
    print(f"serving {cfg.model} at {url}/v1 (completions, chat/completions; Ctrl-C stops)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.delete(deployment.APP_NAME)  # only our app: on a shared cluster other Serve apps keep running
    return 0


if __name__ == "__main__":
    sys.exit(main())
