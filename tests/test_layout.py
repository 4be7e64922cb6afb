"""The dependency rules of README's Layout, checked over the imports of every module (imports inside
functions included): the stages' code may only lean the way the data flows."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("app.config", "app.log")  # the config system and the logger, which every layer may use
RAY_ALLOWED = ("jobs/", "app/ray_env.py", "app/train/run.py", "app/train/loop.py", "app/train/preemption.py",
               "app/serve/deployment.py", "app/data/corpus.py", "app/indexing/")


def modules(*dirs: str) -> list[Path]:
    """The .py files under the given directories of the project."""
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` imports, anywhere in it, as dotted names; `from a import b` gives `a.b`
    (b may be a module or a name in a: both lie under a), relative imports resolved against `root`."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *filter(None, [base])])
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {rel(p): sorted(n for n in imports(p) if under(n, *forbidden)) for p in paths}
    return {p: names for p, names in found.items() if names}


def test_imports_are_read_everywhere(tmp_path):
    """The scan sees imports inside functions and resolves relative ones (else every rule would pass)."""
    pkg = tmp_path / "app" / "serve"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("from . import engine\nfrom ..model.gpt import GPT\ndef f():\n    import ray.train\n")
    assert imports(pkg / "x.py", root=tmp_path) == {"app.serve.engine", "app.model.gpt.GPT", "ray.train"}
    assert under("ray.train", "ray") and not under("rayon", "ray")


def test_nothing_imports_jobs():
    assert not offenders(modules("app", "index", "bench"), ("jobs",))


def test_model_is_plain():
    """app/model knows nothing of Ray, the speed-ups, training or serving; the GPT itself not even
    storage: it is built from a config and handed its weights."""
    assert not offenders(modules("app/model"), ("ray", "app.fast", "app.train", "app.serve", "app.indexing"))
    assert not offenders([ROOT / "app" / "model" / "gpt.py"], ("app.storage", "app.data"))


def test_fast_leans_on_the_model_only():
    """app/fast rewrites a plain model: it may import app/model (and the shared config and logger),
    never training, serving, data or Ray."""
    found = {rel(p): sorted(n for n in imports(p) if under(n, "app", "ray", "jobs", "index")
                            and not under(n, "app.fast", "app.model", *SHARED)) for p in modules("app/fast")}
    assert not {p: n for p, n in found.items() if n}


@pytest.mark.parametrize("stage, other", [("train", "serve"), ("serve", "train")])
def test_train_and_serve_stand_apart(stage, other):
    """Training and serving may use the model, its speed-ups and the data, not each other, nor the
    index builds or the quickstart that sit above them."""
    assert not offenders(modules(f"app/{stage}"), (f"app.{other}", "app.indexing", "app.quickstart"))


def test_index_needs_no_training_serving_or_ray():
    assert not offenders(modules("index"), ("app.train", "app.serve", "ray"))


def test_ray_only_where_the_stages_meet_it():
    """`ray` is imported only by the jobs, Ray's start-up, the training driver, loop and preemption
    notices (SIGTERM's handler is set on the Ray worker's main thread), the Serve deployment, the Ray Data
    tokenizer and the index builds."""
    paths = [p for p in modules("app", "index", "jobs") if not rel(p).startswith(RAY_ALLOWED)]
    assert not offenders(paths, ("ray",))
