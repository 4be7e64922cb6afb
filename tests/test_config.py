"""Config system: defaults < file < flags, nested sections, clear errors."""
from dataclasses import dataclass, field

import pytest

from app.config import ConfigError, from_dict, parse_config, to_dict


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
