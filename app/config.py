"""One config system: dataclasses with working defaults, overridden by a YAML/JSON file, then by
`--key=value` / `--section.key=value` command-line flags; `--help` is generated from the dataclasses."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import os
import shutil
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (nested dataclasses become dicts)."""
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` / `Optional[X]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


YAML_BOOL_WORDS = {True: ("true", "yes", "on"), False: ("false", "no", "off")}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the annotated type `tp`."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: None is not allowed")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _merge(tp(), value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):
            value = json.loads(value)
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads true/yes/on and false/no/off as booleans: the choice so spelt
            value = next((w for w in YAML_BOOL_WORDS[value] if w in choices), value)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is str and isinstance(value, bool):  # YAML's `true` for an auto | true | false field
        return "true" if value else "false"
    if tp in (int, float, str):
        if isinstance(value, (dict, list)):  # `--name.x=1` on a scalar, or a mapping in the file
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int and isinstance(value, str):
                return int(float(value)) if "e" in value.lower() else int(value)
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def _dotted_fields(cls: type, prefix: str = "") -> list[str]:
    """Every option of dataclass `cls` by its dotted name, the fields of nested sections included."""
    out: list[str] = []
    for name, tp in _field_types(cls).items():
        out += _dotted_fields(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return out


def _suggestions(key: str, cls: type) -> list[str]:
    """The options of `cls` that a mistyped or misplaced `key` may mean: those whose own name (in any
    section) is `key` or close to it, by their dotted names."""
    by_name: dict[str, list[str]] = {}
    for dotted in _dotted_fields(cls):
        by_name.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
    return [d for name in difflib.get_close_matches(key, by_name, n=1, cutoff=0.8) for d in by_name[name]]


def _merge(cfg: T, data: dict[str, Any], where: str) -> T:
    types_ = _field_types(type(cfg))
    unknown = set(data) - set(types_)
    if unknown:
        close = [m for k in sorted(unknown) for m in _suggestions(k, type(cfg))]
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(types_))}"
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; {hint}")
    for k, v in data.items():
        if dataclasses.is_dataclass(types_[k]) and isinstance(v, dict):
            setattr(cfg, k, _merge(getattr(cfg, k), v, f"{where}.{k}"))
        else:
            setattr(cfg, k, _coerce(v, types_[k], f"{where}.{k}"))
    return cfg


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from (possibly partial, possibly nested) plain data; unknown keys are errors.

    A config class may define `validate()` (raising ConfigError); it runs on the result."""
    cfg = _merge(cls(), data, cls.__name__)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def check_choices(cfg: Any, where: str) -> None:
    """ConfigError (one line) for a `Literal` field of dataclass `cfg` holding a value outside its choices
    (a config built in code skips the parser's check); `where` prefixes the field's name, e.g. "perf."."""
    for name, tp in _field_types(type(cfg)).items():
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
        if choices and getattr(cfg, name) not in choices:
            raise ConfigError(f"{where}{name}={getattr(cfg, name)!r} must be one of {', '.join(map(str, choices))}")


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
        if not isinstance(data, dict):
            raise ConfigError(f"--{dotted}: {k} is not a section")
    data[keys[-1]] = value



# ---------------------------------------------------------------- help, generated from the dataclasses

def _own_line(source_lines: list[str], lineno: int) -> bool:
    return source_lines[lineno - 1].lstrip().startswith("#")


@functools.cache
def _source_comments(cls: type) -> dict[str, str]:
    """Help of the fields `cls` itself declares, from its source: a field's trailing `# comment`, else the
    comment block just above it. Empty when the source cannot be read."""
    try:
        source = textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        node = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndexError):
        return {}
    lines = source.splitlines()
    out: dict[str, str] = {}
    for stmt in getattr(node, "body", []):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        span = range(stmt.lineno, stmt.end_lineno + 1)
        text = [comments[n] for n in span if n in comments and not _own_line(lines, n)]
        if not text:
            n = stmt.lineno - 1
            while n in comments and _own_line(lines, n):
                text.insert(0, comments[n])
                n -= 1
        if text:
            out[stmt.target.id] = " ".join(text)
    return out


def field_help(cls: type) -> dict[str, str]:
    """One line of help per field of dataclass `cls` (inherited fields too): its source comment, else
    `field(metadata={"help": ...})`, else ""."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_source_comments(klass))
    return {f.name: comments.get(f.name) or f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def class_doc(cls: type) -> str:
    """The first paragraph of the class docstring, on one line ("" for dataclass's generated signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def type_name(tp: Any) -> str:
    """How `--help` shows an annotation: int, float, str, bool, list[str], dict, {a,b,c}; `|none` when optional."""
    tp, optional = _unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        name = "{" + ",".join(str(a) for a in args) + "}"
    elif origin in (list, tuple):
        name = f"{origin.__name__}[{type_name(args[0]) if args else 'any'}]"
    elif origin is dict or tp is dict:
        name = "dict"
    else:
        name = getattr(tp, "__name__", str(tp))
    return name + ("|none" if optional else "")


def format_value(value: Any) -> str:
    """A value as it would be typed on the command line: true/false, none, a,b,c, JSON for dicts and for
    strings that are empty or hold whitespace."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
        return json.dumps(value)
    return str(value)


HELP_COLUMN = 32  # where an option's help starts


def _option_lines(name: str, help_: str, width: int) -> list[str]:
    """`  --name TYPE` with its help wrapped in a column beside it (below it when the name is long)."""
    left, indent = f"  {name}", " " * HELP_COLUMN
    wrapped = textwrap.wrap(help_, max(width - HELP_COLUMN, 30), break_long_words=False, break_on_hyphens=False)
    wrapped = wrapped or [""]
    if len(left) + 2 > HELP_COLUMN:
        return [left] + [indent + w for w in wrapped]
    return [left.ljust(HELP_COLUMN) + wrapped[0]] + [indent + w for w in wrapped[1:]]


def _section_lines(cfg: Any, prefix: str, width: int) -> list[str]:
    """The options of one config section; nested sections follow under their own heading."""
    lines: list[str] = []
    sections: list[tuple[str, Any]] = []
    helps, hints = field_help(type(cfg)), _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
            continue
        default = f"(default: {format_value(value)})"
        entry = _option_lines(f"--{prefix}{f.name} {type_name(hints[f.name])}", helps[f.name], width)
        if len(entry[-1]) + 1 + len(default) <= width and entry[-1].strip():
            entry[-1] += " " + default
        else:
            entry.append(" " * HELP_COLUMN + default)
        lines += entry
    for name, section in sections:
        doc = class_doc(type(section)) or field_help(type(cfg))[name]
        lines += ["", f"{prefix}{name}:" + (f" {doc}" if doc else "")]
        lines += _section_lines(section, f"{prefix}{name}.", width)
    return lines


GENERAL_OPTIONS = (
    ("--config FILE", "YAML or JSON file of option values (nested sections as mappings); flags override it"),
    ("--verbose", "show Ray's own log lines on the console (else they stay in Ray's log files)"),
    ("-h, --help", "show this help and exit"),
)


def format_help(cls: type, prog: str) -> str:
    """`--help` for a config dataclass: every option (nested sections under a heading) with its type, default
    and one-line help, then the options every stage has."""
    width = min(max(shutil.get_terminal_size((100, 24)).columns, 72), 120)
    lines = [f"usage: spotlm {prog} [--config FILE] [--key=value ...] [--verbose]", ""]
    if class_doc(cls):
        lines += [class_doc(cls), ""]
    lines += ["options:"] + _section_lines(cls(), "", width) + ["", "general:"]
    for name, text in GENERAL_OPTIONS:
        lines += _option_lines(name, text, width)
    lines += [""] + textwrap.wrap("Values: --key=value or --key value; a bare --flag is true; lists as a,b,c; none "
                                  "clears an optional value. Precedence: defaults < --config file < flags.", width)
    return "\n".join(lines)


# ---------------------------------------------------------------- parsing the command line

def refuse(prog: str, error: object) -> int:
    """Report a configuration error as one line `<prog>: <error>` on stderr; returns its exit status, 2."""
    print(f"{prog}: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def _stage_name(cls: type) -> str:
    """TrainConfig -> train: the stage a config class belongs to, when the caller names none."""
    name = cls.__name__
    return (name[:-len("Config")] if name.endswith("Config") else name).lower()


def _read_flags(argv: list[str]) -> tuple[str | None, bool, list[tuple[str, str]]]:
    """(config file, verbose, [(dotted key, value)]) from `--key=value`, `--key value` and bare `--flag` tokens."""
    config, verbose, flags, i = None, False, [], 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r} (options look like --key=value)")
        key, eq, value = tok[2:].partition("=")
        if not eq:  # `--key value`, or a bare `--flag` (true)
            takes_next = key != "verbose" and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value, i = (argv[i + 1], i + 1) if takes_next else ("true", i)
            if key == "config" and not takes_next:
                raise ConfigError("--config needs a file: --config=FILE")
        if key == "verbose":
            verbose = _coerce(value, bool, "--verbose")
        elif key == "config":
            config = value
        else:
            flags.append((key.replace("-", "_"), value))
        i += 1
    return config, verbose, flags


def _read_file(path: str) -> dict[str, Any]:
    from app import storage  # local import: config must stay importable without storage deps

    try:
        data = yaml.safe_load(storage.read_text(path))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not YAML/JSON ({e})") from None
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"config file {path}: expected a mapping of options, got {type(data).__name__}")
    return data or {}


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """Parse `[--config FILE] [--key=value | --key value | --section.key=value | --flag ...]` into `cls`.

    Precedence: dataclass defaults < config file < flags. A bare `--flag` sets a bool to true. `-h`/`--help`
    prints every option and exits 0; `--verbose` (no config field) sets SPOTLM_VERBOSE=1, which init_ray reads.
    Unknown keys, unparsable values and `validate()` errors exit 2 with one line `<prog>: <message>`; `prog`
    defaults to the stage the class name says (TrainConfig -> train).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or _stage_name(cls)
    if "-h" in argv or "--help" in argv:
        try:
            print(format_help(cls, prog), flush=True)
        except BrokenPipeError:  # `--help | head` closed the pipe: no traceback (Python's documented recipe)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    try:
        config, verbose, flags = _read_flags(argv)
        data = _read_file(config) if config else {}
        for key, value in flags:
            _set_path(data, key, value)
        cfg = from_dict(cls, data)
    except ConfigError as e:
        sys.exit(refuse(prog, e))
    if verbose:
        os.environ["SPOTLM_VERBOSE"] = "1"
    return cfg
