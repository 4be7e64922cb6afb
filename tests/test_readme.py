"""The READMEs as a user reads them: README.md is short, its two commands are what CI runs, every
`spotlm <stage>` / `python -m jobs.<stage>` command in the docs parses into that stage's config, every
module the Layout names exists, and the local walkthrough runs for real (slow)."""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import json
import re
import shlex
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "cluster" / "README.md"]
SHELL = {"bash", "sh", "shell"}
UNIVERSAL_FLAGS = {"config", "verbose", "help"}  # app.config.parse_config's own, in every stage
PLACEHOLDERS = {"key", "section.key"}  # the README's `--key=value` / `--section.key=value`


def code_blocks(text: str, langs: set[str]) -> list[str]:
    """The bodies of the fenced code blocks whose language is one of `langs`."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) in langs]


def section(text: str, heading: str) -> str:
    """The text under `## heading`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at
    `;`, `&`, `&&`, `|`, `||`; words unquoted as the shell would (variables and globs stay as written)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for word in lexer:
            if set(word) <= set(";&|"):
                commands.append(command)
                command = []
            else:
                command.append(word)
        commands.append(command)
    return [c for c in commands if c]


def stage_argv(command: list[str]) -> tuple[str, list[str]] | None:
    """(stage, its arguments) for `spotlm <stage> ...` or `python -m jobs.<stage> ...`, else None."""
    for i, word in enumerate(command):
        if Path(word).name == "spotlm" and i + 1 < len(command):
            return command[i + 1], command[i + 2:]
        if word == "-m" and i + 1 < len(command) and command[i + 1].startswith("jobs."):
            module = command[i + 1].removeprefix("jobs.")
            if module == "cli":
                return command[i + 2], command[i + 3:]
            return module, command[i + 2:]
    return None


def doc_commands(path: Path) -> list[tuple[str, list[str]]]:
    return [sa for block in code_blocks(path.read_text(), SHELL) for c in shell_commands(block)
            if (sa := stage_argv(c))]


@functools.cache
def stage_config(stage: str) -> type:
    """The config dataclass `jobs.<stage>` parses its arguments into: the first argument of its
    `parse_config(...)` call, looked up where the module has it."""
    from jobs.cli import STAGES

    assert stage in STAGES, f"`{stage}` is not a stage of the spotlm command ({', '.join(STAGES)})"
    module = importlib.import_module(f"jobs.{stage}")
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        name = getattr(func, "id", None) or getattr(func, "attr", None)
        if isinstance(node, ast.Call) and name == "parse_config" and isinstance(node.args[0], ast.Name):
            return _lookup(module, tree, node.args[0].id)
    raise AssertionError(f"jobs/{stage}.py calls no parse_config(<Config>, ...)")


def _lookup(module, tree: ast.Module, name: str) -> type:
    if hasattr(module, name):
        return getattr(module, name)
    for node in ast.walk(tree):  # imported inside a function
        if isinstance(node, ast.ImportFrom) and any(a.name == name and not a.asname for a in node.names):
            return getattr(importlib.import_module(node.module), name)
    raise AssertionError(f"{module.__name__}: cannot find {name}")


def has_option(cls: type, dotted: str) -> bool:
    """Whether `--<dotted>` names a field of config `cls` (nested sections by dots; a free-form mapping
    named `model` holds ModelConfig fields)."""
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        return False
    tp = typing.get_type_hints(cls)[head]
    if dataclasses.is_dataclass(tp):
        return not rest or has_option(tp, rest)
    if typing.get_origin(tp) is dict and head == "model" and rest:
        from app.model.gpt import ModelConfig

        return rest in {f.name for f in dataclasses.fields(ModelConfig)}
    return not rest


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the limit is 200 (history goes to bench/RESULTS.md)"


def test_the_two_commands_are_what_ci_runs():
    """The install line runs .ci/run's install commands in order (quietness aside), then the
    quickstart; the test command is .ci/run's, word for word."""
    ci = [shlex.split(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith(("python3 -m venv", ".venv/bin/"))]
    *ci_install, ci_test = ci
    install, test = code_blocks(section(README.read_text(), "The two commands"), SHELL)
    readme_install = shell_commands(install)
    assert readme_install == [[w for w in c if w != "-q"] for c in ci_install] + [[".venv/bin/spotlm", "quickstart"]]
    assert shell_commands(test) == [ci_test] == [[".venv/bin/python", "-m", "pytest", "-q"]]


COMMANDS = [(path.relative_to(ROOT).as_posix(), stage, argv) for path in DOCS for stage, argv in doc_commands(path)]


def test_docs_have_commands_for_every_stage():
    from jobs.cli import STAGES

    assert {stage for doc, stage, _ in COMMANDS if doc == "README.md"} == set(STAGES)


@pytest.mark.parametrize("doc, stage, argv", COMMANDS, ids=[f"{d}:{s}:{i}" for i, (d, s, _) in enumerate(COMMANDS)])
def test_doc_command_parses(doc, stage, argv, capsys):
    """Each documented command parses into its stage's config (an option renamed in code but not in
    the docs fails here)."""
    from app.config import parse_config

    cls = stage_config(stage)
    try:
        parse_config(cls, argv)
    except SystemExit as e:
        if "--help" in argv and e.code == 0:
            return
        pytest.fail(f"{doc}: `{stage} {shlex.join(argv)}` does not parse into {cls.__name__}: "
                    f"{capsys.readouterr().err.strip()}")


def test_options_named_in_readme_prose_exist():
    """Every option the README's prose names (an inline `--option...`) is an option of some stage, or a
    universal flag. (Commands of other programs, such as `bench.*`, are left to their own tests.)"""
    from jobs.cli import STAGES

    configs = [stage_config(s) for s in STAGES]
    text = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.S | re.M)
    spans = [span for span in re.findall(r"`([^`]+)`", text) if span.startswith("--")]
    named = {m.group(1) for span in spans for m in re.finditer(r"--([\w.]+)", span)}
    unknown = sorted(o for o in named - UNIVERSAL_FLAGS - PLACEHOLDERS if not any(has_option(c, o) for c in configs))
    assert named and not unknown, f"README.md names options no stage has: {unknown}"


def layout_paths() -> list[str]:
    """The paths that open each line of README's Layout block (words with a `/`), braces expanded."""
    block, = code_blocks(section(README.read_text(), "Layout"), {"text"})
    paths = []
    for line in block.splitlines():
        for word in line.split():
            if "/" not in word:
                break
            match = re.fullmatch(r"(.*)\{(.*)\}(.*)", word)
            paths += [match.group(1) + part + match.group(3) for part in match.group(2).split(",")] if match else [word]
    return paths


def test_layout_paths_exist():
    paths = layout_paths()
    assert len(paths) > 30
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README.md's Layout names what does not exist: {missing}"


def walkthrough() -> list[tuple[str, list[str]]]:
    """README's local walkthrough: the stage commands of the 'Running locally' block, in order, less
    the backgrounded server (its one-shot `--prompt` form is in the block too)."""
    block, = code_blocks(section(README.read_text(), "Running locally"), SHELL)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if not line.rstrip().endswith("&")]
    return [sa for c in shell_commands("\n".join(lines)) if (sa := stage_argv(c))]


def localize(argv: list[str], tmp: Path, text: Path) -> list[str]:
    """The README's arguments with its paths moved under `tmp` and its input text replaced by `text`."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key == "--inputs":
            value = str(text)
        elif value == "runs" or value.startswith("runs/"):
            value = str(tmp / value)
        out.append(key + eq + value)
    return out


@pytest.mark.slow
def test_readme_walkthrough_runs(ray_session, shared_data, tmp_path, capsys):
    """Every command of the walkthrough, as written but on a small text under tmp_path with a few
    training steps appended (later flags win), succeeds and leaves what the README says it does."""
    from jobs.cli import main

    speeches = (shared_data / "tinyshakespeare.txt").read_text()[:120_000].split("\n\n")
    text = tmp_path / "play.jsonl"  # one document per speech, so the hash split holds some out
    text.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    commands = walkthrough()
    assert [s for s, _ in commands] == ["tokenize", "build_index", "train", "train", "build_knn", "eval", "serve"]
    trained = 0
    for stage, argv in commands:
        argv = localize(argv, tmp_path, text)
        if stage == "train":
            trained += 4
            argv.append(f"--max_steps={trained}")  # the resumed run goes further than the first
        code = main([stage, *argv])
        printed = capsys.readouterr()
        assert code == 0, f"spotlm {stage} {shlex.join(argv)} failed:\n{printed.err[-3000:]}"
        if stage == "eval":  # with and without each index, as step 4 says
            assert all(f'"{v}"' in printed.out for v in ("lm", "lmatch", "knn", "lmatch+knn")), printed.out
    run = tmp_path / "runs" / "my-run"
    assert (tmp_path / "runs" / "shards" / "manifest.json").exists()
    assert list((tmp_path / "runs" / "shards").glob("*.lmatch"))
    assert (run / "export" / "config.json").exists() and (run / "export" / "knn").is_dir()
    assert '"step": 8' in (run / "progress.json").read_text().replace("'", '"')
    assert stage == "serve" and printed.out.strip(), "the one-shot serve printed no completion"
