"""Start or join Ray: a cluster when one is given (RAY_ADDRESS, `ray job submit`), else a local Ray."""
from __future__ import annotations

import os
from pathlib import Path

from app.log import get_logger

log = get_logger(__name__)
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to Ray once per process.

    Inside a Ray job or with RAY_ADDRESS set this joins that cluster. Otherwise it starts a local
    Ray in-process with at least 4 logical CPUs: on 2-core machines actors holding every CPU
    would starve Ray Data's read tasks (the 2-CPU deadlock). Workers get the project on their
    PYTHONPATH, since they run in another working directory.
    """
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}}
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(log_to_driver=True)
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    log.info("starting a local Ray (%d logical CPUs)", cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)
