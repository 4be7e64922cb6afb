"""The `spotlm` command: every stage's --help lists its options; configuration errors are refused in the
driver, before Ray starts, in one line with exit status 2."""
import dataclasses
import importlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app import ray_env
from app.config import field_help, format_value
from app.data.shards import Manifest, write_shard
from jobs import cli

ROOT = Path(__file__).resolve().parents[1]


def _options(cfg, prefix: str = ""):
    """(dotted name, default, help) of every option of a config instance, nested sections included."""
    helps = field_help(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _options(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value, helps[f.name]


def _config_class(stage: str, monkeypatch, capsys) -> tuple[type, str]:
    """The stage's config class (learnt from the job itself, by spying on its parse_config) and its --help."""
    module = importlib.import_module(f"jobs.{stage}")
    real, seen = module.parse_config, []

    def spy(cls, *args, **kw):
        seen.append(cls)
        return real(cls, *args, **kw)

    monkeypatch.setattr(module, "parse_config", spy)
    with pytest.raises(SystemExit) as e:
        cli.main([stage, "--help"])
    assert e.value.code == 0 and len(seen) == 1
    return seen[0], capsys.readouterr().out


def _entries(text: str) -> dict[str, str]:
    """--help text -> {option name: its whole entry, continuation lines joined}."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("  -"):
            name = line.split()[0]
            entries[name] = line
        elif line.startswith("   ") and entries:
            entries[name] += " " + line.strip()
    return entries


@pytest.mark.parametrize("stage", list(cli.STAGES))
def test_every_stage_help_lists_every_option_with_its_default(stage, monkeypatch, capsys):
    cls, out = _config_class(stage, monkeypatch, capsys)
    assert out.startswith(f"usage: spotlm {stage} ")
    entries = _entries(out)
    options = list(_options(cls()))
    assert options and {"--config", "--verbose"} <= set(entries)
    for name, default, help_ in options:
        assert f"--{name}" in entries, f"{stage} --help does not list --{name}"
        assert f"(default: {format_value(default)})" in entries[f"--{name}"], entries[f"--{name}"]
        assert " ".join(help_.split()) in " ".join(entries[f"--{name}"].split()), f"--{name}: help {help_!r} not shown"


@pytest.mark.parametrize("stage", list(cli.STAGES))
def test_every_option_has_a_help_line(stage, monkeypatch, capsys):
    cls, _ = _config_class(stage, monkeypatch, capsys)
    missing = {name for name, _, help_ in _options(cls()) if not help_}
    assert not missing, f"give these {stage} options a trailing # comment: {missing}"


def test_spotlm_without_a_known_stage(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in cli.STAGES)
    assert cli.main([]) == 2
    assert "usage: spotlm <stage>" in capsys.readouterr().err
    assert cli.main(["nope", "--x=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spotlm: unknown stage 'nope'") and "train" in err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A tiny tokenized dataset (vocabulary 256, no LMatch index), written without Ray."""
    root = tmp_path_factory.mktemp("cli") / "shards"
    root.mkdir()
    rng = np.random.default_rng(0)
    shards = {}
    for split, n in (("train", 4096), ("val", 1024)):
        info = write_shard(str(root / f"{split}_000000.bin"), rng.integers(0, 256, n, dtype=np.uint16))
        shards[split] = [{"file": f"{split}_000000.bin", **info}]
    m = Manifest(dtype="uint16", vocab_size=256, eot_id=0, shard_tokens=4096, shards=shards)
    m.root = str(root)
    m.save()
    return str(root)


@pytest.fixture
def no_ray(monkeypatch):
    """Any start of Ray fails the test (the session's Ray may already run: init_ray would only join it)."""
    import ray

    def started(*_, **__):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(ray_env, "init_ray", started)
    for stage in cli.STAGES:
        module = importlib.import_module(f"jobs.{stage}")
        if hasattr(module, "init_ray"):
            monkeypatch.setattr(module, "init_ray", started)


# (stage, flags; {data} is a real dataset, {tmp} an empty directory), what the one line must say
CONFIG_ERRORS = [
    ("train", ["--preset=nope"], "unknown preset 'nope'"),
    ("train", ["--data=/missing"], "no manifest"),
    ("train", ["--optim.lrr=1"], "did you mean lr?"),
    ("train", ["--lr=1e-3"], "unknown key(s) ['lr']; did you mean optim.lr?"),  # the flat options of old: no aliases
    ("train", ["--checkpoint_every=5"], "unknown key(s) ['checkpoint_every']"),
    ("train", ["--optimizer=muon"], "unknown key(s) ['optimizer']"),
    ("train", ["--micro_batch=x"], "expected int"),
    ("train", ["--cluster.min_workers=3"], "cluster.min_workers=3 is more than cluster.num_workers=1"),
    ("train", ["--cluster.use_gpu=yes"], "'yes' is not one of ['auto', 'true', 'false']"),
    ("train", ["--optim.name=muon", "--memory.offload_optimizer"], "optim.name=muon needs whole weight matrices"),
    ("train", ["--optim.ema_decay=0.9", "--memory.fsdp"], "optim.ema_decay averages whole fp32 weights"),
    ("train", ["--ckpt.every=0"], "ckpt.every and ckpt.keep must be >= 1"),
    ("train", ["--data={data}", "--seq_len=4096"], "seq_len=4096 exceeds the model's max_seq_len=128"),
    ("train", ["--data={data}", "--model.n_head=3"], "n_head=3"),
    ("train", ["--data={data}", "--seq_len=64", "--batch_tokens=1000"], "not a multiple of seq_len=64"),
    ("train", ["--data={data}", "--index"], "no LMatch index"),
    ("train", ["--data={data}", "--resume"], "has no checkpoint"),
    ("tokenize", ["--inputs=/missing/x.txt"], "input '/missing/x.txt' matches no file"),
    ("tokenize", ["--inputs={data}/train_000000.bin", "--tokenizer=/missing.json"], "tokenizer file not found"),
    ("tokenize", [], "inputs: give at least one file"),
    ("build_index", ["--data=/missing"], "no manifest"),
    ("build_index", ["--splits=train,test"], "'test' is not one of"),
    ("build_knn", ["--data={data}", "--model=/missing"], "/missing: no model here"),
    ("build_knn", ["--data=/missing", "--model=/missing"], "no manifest"),
    ("build_knn", ["--model=s3://bucket/export"], "written to local disk"),
    ("eval", ["--data={data}", "--model=/missing"], "/missing: no model here"),
    ("eval", ["--data=/missing"], "no manifest"),
    ("eval", ["--data={data}", "--knn={tmp}"], "no meta.json: not a kNN index"),
    ("eval", ["--lambdas=0,2"], "lambdas must be in (0, 1)"),
    ("serve", ["--model=/missing"], "/missing"),
    ("serve", ["--draft_tokens=9"], "draft_tokens=9 is more than max_draft=8"),
    ("serve", ["--draft_tokens=4", "--knn_index={tmp}"], "does not combine with knn_index"),
    ("serve", ["--draft_tokens=4", "--prompt_lookup=false"], "needs a source of drafts"),
    ("serve", ["--prefix_cache_tokens=8"], "blocks of 16 tokens"),
    ("serve", ["--quantize=int4"], "'int4' is not one of ['none', 'int8', 'fp8']"),
]


@pytest.mark.parametrize("stage,flags,says", CONFIG_ERRORS, ids=[f"{s}{' '.join(f)}" for s, f, _ in CONFIG_ERRORS])
def test_config_errors_are_refused_before_ray_in_one_line(stage, flags, says, dataset, tmp_path, no_ray, capsys,
                                                          monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)  # default paths (runs/, runs/shards) resolve to nothing here
    was_up = ray.is_initialized()
    argv = [stage] + [f.format(data=dataset, tmp=tmp_path) for f in flags] + [f"--storage={tmp_path}"] * (stage == "train")
    t0 = time.perf_counter()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # parse_config exits; the preflights return
        code = e.code
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"{stage}: ") and says in err, err
    assert elapsed < 10 and ray.is_initialized() == was_up


def test_the_command_line_itself_exits_2_in_one_line_without_ray(tmp_path):
    """The installed entry point (jobs.cli:main) as a user runs it: nothing but the one line on stderr."""
    r = subprocess.run([sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main())",
                        "train", "--preset=nope"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("train: unknown preset 'nope'; presets: tiny")
