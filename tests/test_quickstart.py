"""The quickstart as a user runs it (a shortened run): its console, its output paths, a rerun."""
import glob
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from app.quickstart import QuickstartConfig, stdlib_corpus

ROOT = Path(__file__).resolve().parents[1]
# What Ray prints when its own output reaches the console (it belongs in Ray's log files)
RAY_INTERNALS = ("core_worker", "raylet", "Failed to query", "(RayTrainWorker", "(TrainController", "(pid=",
                 "INFO worker.py", "streaming_executor", "Traceback", "preemption", "WARNING", "ERROR")


def test_default_corpus_exists_everywhere():
    assert len(glob.glob(stdlib_corpus()[0])) > 50


def test_paths_are_the_documented_ones():
    tcfg = QuickstartConfig().train_config()
    run = os.path.abspath("runs/quickstart")
    assert (tcfg.data, tcfg.run_dir, tcfg.export_dir) == (f"{run}/shards", run, f"{run}/export")


def _quickstart(cwd: Path, *flags: str) -> list[str]:
    """Run `python -m jobs.quickstart` in `cwd`; returns its console lines (stdout and stderr, in order)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPOTLM_VERBOSE", None)
    p = subprocess.run([sys.executable, "-m", "jobs.quickstart", *flags], cwd=cwd, env=env, timeout=300,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0, p.stdout
    return p.stdout.splitlines()


@pytest.mark.slow
def test_quickstart_console_fits_a_screen(tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    flags = (f"--inputs={stdlib}/[a-c]*.py", "--vocab_size=512", "--max_steps=30", "--max_tokens=8")
    lines = _quickstart(tmp_path, *flags)
    out = "\n".join(lines)
    assert len(lines) <= 40, out
    assert not [s for s in RAY_INTERNALS if s in out], out
    for stage in ("[1/4] tokenize", "[2/4] build", "[3/4] train", "step 30/30", "trained quickstart: 30 steps",
                  "[4/4] serve", "quickstart finished"):
        assert stage in out, f"{stage!r} missing:\n{out}"
    assert out.index("quickstart finished") < out.index("=== prompt ===") < out.index("=== completion ===")
    after = lines[lines.index("=== completion ===") + 1:]
    assert after and not [s for s in after if re.match(r"\d\d:\d\d:\d\d ", s)], out  # the completion ends it
    run = tmp_path / "runs" / "quickstart"  # the default workdir, relative to where it runs
    assert (run / "shards" / "manifest.json").exists()
    assert (run / "checkpoint_00000030" / "DONE").exists()
    assert (run / "export" / "config.json").exists()
    assert not (run / "runs").exists()

    again = "\n".join(_quickstart(tmp_path, *flags))  # a rerun reuses the finished stages
    assert "already tokenized" in again and "quickstart finished" in again, again
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_00000030"]


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_output_reaches_the_console_only_when_verbose(tmp_path, verbose):
    code = ("from app.ray_env import init_ray; init_ray(); import ray; "
            "ray.get(ray.remote(lambda: print('printed by a task')).remote()); ray.shutdown()")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPOTLM_VERBOSE": "1" if verbose else "0"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, timeout=120, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0, p.stdout
    assert ("printed by a task" in p.stdout) == verbose, p.stdout
    assert ("Started a local Ray instance" in p.stdout) == verbose, p.stdout
