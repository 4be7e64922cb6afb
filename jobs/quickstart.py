"""Ray job: the whole pipeline (tokenize -> index -> train -> serve -> a completion) on a local Ray, on CPU.

    spotlm quickstart            # or: python -m jobs.quickstart
"""
from __future__ import annotations

import sys

from app.config import parse_config, refuse
from app.data.corpus import InputError, resolve_inputs
from app.quickstart import QuickstartConfig, run_quickstart
from app.ray_env import init_ray


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(QuickstartConfig, argv, prog="quickstart")
    try:
        resolve_inputs(cfg.inputs)  # before Ray: inputs that match nothing are refused in one line
    except InputError as e:
        return refuse("quickstart", e)
    init_ray()
    text = run_quickstart(cfg)
    print(f"\n=== prompt ===\n{cfg.prompt}\n=== completion ===\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
