"""Ray job: the whole pipeline (tokenize -> train -> serve -> a completion) on a local Ray, on CPU.

    spotlm quickstart            # or: python -m jobs.quickstart
"""
from __future__ import annotations

import sys

from app.config import parse_config
from app.quickstart import QuickstartConfig, run_quickstart
from app.ray_env import init_ray


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(QuickstartConfig, argv)
    init_ray()
    text = run_quickstart(cfg)
    print("\n=== prompt ===\n" + cfg.prompt + "\n=== completion ===\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
