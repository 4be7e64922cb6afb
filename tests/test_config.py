"""Config system: defaults < file < flags, nested sections, clear errors, generated --help."""
import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from app.config import (ConfigError, check_choices, field_help, format_value, from_dict, parse_config, to_dict,
                        type_name)


@dataclass
class Inner:
    width: int = 8
    ratio: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    path: str | None = None
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)

    def validate(self):
        if self.steps < 0:
            raise ConfigError("steps must be >= 0")


def test_defaults_file_flags_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\ninner:\n  width: 16\n")
    cfg = parse_config(Outer, ["--config", str(f), "--inner.ratio=0.25", "--flag", "--tags=a,b", "--name", "y"])
    assert (cfg.steps, cfg.inner.width, cfg.inner.ratio, cfg.flag, cfg.tags, cfg.name) == (20, 16, 0.25, True, ["a", "b"], "y")
    assert cfg.path is None
    assert to_dict(cfg)["inner"] == {"width": 16, "ratio": 0.25}


def test_flags_override_file_and_nested_dict(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"steps": 5}')
    cfg = parse_config(Outer, [f"--config={f}", "--steps=7", "--extra.n_layer=4", "--path=none"])
    assert cfg.steps == 7 and cfg.extra == {"n_layer": "4"} and cfg.path is None


@pytest.mark.parametrize("argv,msg", [
    (["--nope=1"], "unknown key"),
    (["--steps=abc"], "expected int"),
    (["--flag=maybe"], "true/false"),
    (["--steps=-1"], "steps must be"),
    (["--inner.depth=3"], "unknown key"),
    (["positional"], "unexpected argument"),
])
def test_bad_values_exit_with_one_line(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Outer, argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_from_dict_round_trip():
    cfg = from_dict(Outer, {"inner": {"width": 3}, "tags": ["t"]})
    assert from_dict(Outer, to_dict(cfg)) == cfg


# ---------------------------------------------------------------- --help, generated from the dataclasses

@dataclass
class Optim:
    """Optimizer settings."""

    lr: float = 1e-3  # peak learning rate
    # which update rule: adamw for everything,
    # or muon on the matrices
    name: Literal["adamw", "muon"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"help": "Adam's betas"})
    decay: float = field(default=0.1,  # weight decay on matrices
                         metadata={"help": "not used: the comment wins"})


@dataclass
class Job:
    name: str = "run"  # the run's name
    mode: Literal["auto", "true", "false"] = "auto"  # graph the step
    path: str | None = None  # where it goes
    prompt: str = "a b"  # text with a space
    note: str = ""
    optim: Optim = field(default_factory=Optim)  # optimizer section


def test_field_help_reads_trailing_and_block_comments_then_metadata():
    assert field_help(Optim) == {"lr": "peak learning rate", "name": "which update rule: adamw for everything, or "
                                 "muon on the matrices", "betas": "Adam's betas", "decay": "weight decay on matrices"}
    assert field_help(Job)["note"] == "" and field_help(Job)["optim"] == "optimizer section"


def test_type_names_and_values_as_typed_on_the_command_line():
    assert [type_name(t) for t in (int, float, bool, str, str | None, list[float], dict, Literal["a", "b"])] == \
        ["int", "float", "bool", "str", "str|none", "list[float]", "dict", "{a,b}"]
    assert [format_value(v) for v in (None, True, [0.9, 0.95], [], {}, "", "a b", "x", 2.5)] == \
        ["none", "true", "0.9,0.95", "[]", "{}", '""', '"a b"', "x", "2.5"]
    assert parse_config(Optim, ["--betas=" + format_value([0.9, 0.95])]).betas == [0.9, 0.95]


def _entries(text: str) -> dict[str, str]:
    """--help text -> {option name: its whole entry (name, type, help and default lines joined)}."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("  --") or line.startswith("  -h"):
            name = line.split()[0]
            entries[name] = line
        elif line.startswith("   ") and entries:
            entries[name] += " " + line.strip()
    return entries


def test_help_lists_every_option_with_type_default_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Job, ["--name=x", "--help"], prog="job")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: spotlm job ")
    entries = _entries(out)
    assert entries["--name"].split(None, 2)[1] == "str" and "the run's name (default: run)" in entries["--name"]
    assert "{auto,true,false}" in entries["--mode"] and "(default: auto)" in entries["--mode"]
    assert "str|none" in entries["--path"] and "(default: none)" in entries["--path"]
    assert '(default: "a b")' in entries["--prompt"] and '(default: "")' in entries["--note"]
    assert "--optim" not in entries  # a section, not an option: its fields are listed under its heading
    assert "\noptim: Optimizer settings.\n" in out  # the section's docstring heads it
    assert "peak learning rate (default: 0.001)" in entries["--optim.lr"]
    assert "{adamw,muon}" in entries["--optim.name"] and "or muon on the matrices" in entries["--optim.name"]
    assert "Adam's betas (default: 0.9,0.95)" in entries["--optim.betas"]
    assert {"--config", "--verbose", "-h,"} <= set(entries)
    assert out.index("--optim.lr") > out.index("--note")  # sections after the plain options


def test_verbose_is_universal_and_not_a_field(monkeypatch):
    monkeypatch.delenv("SPOTLM_VERBOSE", raising=False)
    parse_config(Job, ["--name=x"])
    assert "SPOTLM_VERBOSE" not in os.environ
    assert parse_config(Job, ["--verbose", "--name=y"]).name == "y"
    assert os.environ["SPOTLM_VERBOSE"] == "1"


def test_literal_choices_and_yaml_booleans(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("mode: true\noptim:\n  name: muon\n")
    cfg = parse_config(Job, ["--config", str(f)])
    assert (cfg.mode, cfg.optim.name) == ("true", "muon")
    with pytest.raises(SystemExit) as e:
        parse_config(Job, ["--optim.name=sgd"], prog="job")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("job: ") and "'sgd' is not one of ['adamw', 'muon']" in err


def test_choices_are_checked_on_configs_built_in_code():
    """The parser refuses a value outside a Literal's choices; `check_choices` does for a config built in code."""
    check_choices(Job(), "")
    with pytest.raises(ConfigError, match=r"optim.name='sgd' must be one of adamw, muon"):
        check_choices(Optim(name="sgd"), "optim.")


def test_unknown_keys_suggest_the_option_of_that_name_in_its_section(capsys):
    """A key given at the top level that is an option of a section (or close to one) names its dotted form."""
    for argv, hint in ((["--lr=1"], "did you mean optim.lr?"), (["--decayy=1"], "did you mean optim.decay?"),
                       (["--zzz=1"], "known: mode, name, note, optim, path, prompt")):
        with pytest.raises(SystemExit):
            parse_config(Job, argv, prog="job")
        assert hint in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--optim.lrr=1"], "did you mean lr?"),
    (["--config"], "--config needs a file"),
    (["--config=/no/such.yaml"], "config file not found"),
    (["--name.x=1"], "Job.name: expected str, got {'x': '1'}"),
    (["--name=a", "--name.x=1"], "--name.x: name is not a section"),
])
def test_config_errors_are_one_line_naming_the_stage(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Job, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("job: ") and msg in err


def test_yaml_off_and_on_are_the_choices_so_spelt(tmp_path):
    """YAML 1.1 reads `off` / `on` as booleans: a Literal choice spelt that way gets them back as its word."""
    from app.train.config import TrainConfig

    f = tmp_path / "c.yaml"
    f.write_text("perf:\n  fp8: off\n  compile: no\n")
    cfg = parse_config(TrainConfig, ["--config", str(f)])
    assert (cfg.perf.fp8, cfg.perf.compile) == ("off", "false")
    f.write_text("perf:\n  fp8: on\n")
    with pytest.raises(SystemExit):  # no choice of fp8 is spelt like true
        parse_config(TrainConfig, ["--config", str(f)])
