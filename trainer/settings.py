"""Settings of every command, one model: dataclasses, `--set key=value`, `config.json`, resume checks.

A command's settings are a dataclass: either flat (detect, segment, depth, evaluate: `--set lr=0.01`)
or made of section dataclasses (pretraining's Config: `--set optim.base_lr=0.5`). This module
knows nothing of any command:

- `apply_override(settings, "key=value")`: one `--set`; the value is read as JSON when it can be
  and must fit the setting's current type (a number for a number, true/false for a flag).
- `to_dict`, `from_dict`, `dumps`: the JSON form (unknown keys of an older file are ignored).
- `write_config(out, settings)` / `read_config(out, cls)`: `config.json` in the run directory.
- `check_unchanged(saved, current, keys)`: the refusal of a resume that would silently change the
  run (a setting that shapes the model, the data or the schedule).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from pathlib import Path

from contract.errors import UsageError

CONFIG_NAME = "config.json"


def _is_section(value) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _sections(settings) -> list[str]:
    return [f.name for f in dataclasses.fields(settings) if _is_section(getattr(settings, f.name))]


def to_dict(settings) -> dict:
    return dataclasses.asdict(settings)


def from_dict(cls, d: dict):
    """`cls` from its JSON form, section by section; keys the dataclasses no longer have are ignored."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind) and isinstance(d[f.name], dict):
            kwargs[f.name] = from_dict(kind, d[f.name])
        else:
            kwargs[f.name] = d[f.name]
    return cls(**kwargs)


def dumps(settings) -> str:
    return json.dumps(to_dict(settings), indent=2)


def write_config(out: str | Path, settings) -> Path:
    """Write `out/config.json` atomically (settings: a dataclass or an already plain dict)."""
    from .checkpoint import atomic_write
    path = Path(out) / CONFIG_NAME
    text = dumps(settings) if dataclasses.is_dataclass(settings) else json.dumps(settings, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read_config(out: str | Path, cls):
    return from_dict(cls, json.loads((Path(out) / CONFIG_NAME).read_text()))


def _parse_value(current, raw: str, path: str):
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(current, bool) and not isinstance(value, bool):
        raise UsageError(f"--set {path}: expected true or false, got {raw!r}")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"--set {path}: expected a number, got {raw!r}")
        value = type(current)(value) if isinstance(current, float) or float(value).is_integer() else value
    if isinstance(current, str) and not isinstance(value, str):
        value = raw
    return value


def apply_override(settings, assignment: str) -> None:
    """Apply one `--set key=value` (`section.key=value` for sectioned settings) in place."""
    sections = _sections(settings)
    shape = "section.key=value" if sections else "key=value"
    if "=" not in assignment:
        raise UsageError(f"--set expects {shape}, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    if sections:
        if len(parts) != 2 or parts[0] not in sections:
            example = f"{sections[0]}.{dataclasses.fields(getattr(settings, sections[0]))[0].name}"
            example = "optim.base_lr" if "optim" in sections else example
            raise UsageError(f"--set: unknown setting {path!r}; settings look like {example}")
        target, name, where = getattr(settings, parts[0]), parts[1], parts[0]
    else:
        if len(parts) != 1:
            raise UsageError(f"--set: unknown setting {path!r}; settings here are plain names like "
                             f"{dataclasses.fields(settings)[0].name}")
        target, name, where = settings, parts[0], None
    names = {f.name for f in dataclasses.fields(target)}
    if name not in names and where is None:
        raise UsageError(f"--set: no setting {name!r}; the settings are {', '.join(sorted(names))}")
    if name not in names:
        raise UsageError(f"--set: {where} has no setting {name!r}; it has {', '.join(sorted(names))}")
    setattr(target, name, _parse_value(getattr(target, name), raw, path.strip()))


def apply_overrides(settings, assignments) -> None:
    for assignment in assignments or ():
        apply_override(settings, assignment)


def get(settings, key: str):
    """A setting by dotted name (`optim.base_lr`) from a dataclass or its dict form."""
    value = settings
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def check_unchanged(saved, current, keys, flag=lambda key: "--" + key.replace("_", "-")) -> None:
    """Refuse a resume that would change the run: every key in `keys` must be the same in the saved
    settings and the current ones (dataclasses or their dict forms; dotted keys for sections)."""
    changed = [k for k in keys if get(saved, k) != get(current, k)]
    if changed:
        k = changed[0]
        raise UsageError(f"cannot change {', '.join(flag(c) for c in changed)} when resuming "
                         f"(the run has {get(saved, k)!r}, asked for {get(current, k)!r})")


def fixed_on_resume(cls) -> tuple[str, ...]:
    """The settings a resume may not change: the class's FIXED_ON_RESUME, or every field but its
    CHANGEABLE_ON_RESUME."""
    if hasattr(cls, "FIXED_ON_RESUME"):
        return tuple(cls.FIXED_ON_RESUME)
    changeable = set(getattr(cls, "CHANGEABLE_ON_RESUME", ()))
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in changeable)


def resolve(cls, saved: dict | None = None, assignments=(), given: dict | None = None, prepare=None):
    """A command's settings: the defaults (a new run) or the resumed run's saved ones, then the `--set`
    assignments, then the flags given on the command line (`given`: name -> value, None = not given);
    `prepare(settings)` normalises them (absolute paths, parsed sizes) before a resume is checked
    against the saved settings (`fixed_on_resume(cls)`)."""
    s = from_dict(cls, saved) if saved is not None else cls()
    before = copy.deepcopy(s)
    apply_overrides(s, assignments)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in (given or {}).items():
        if value is not None and key in names:
            setattr(s, key, value)
    if prepare is not None:
        prepare(s)
    if saved is not None:
        check_unchanged(before, s, fixed_on_resume(cls))
    return s


def add_set_flag(parser) -> None:
    """The `--set key=value` flag, the same on every command."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any setting by name (value as JSON when it parses, else a string), repeatable; "
                             "config.json in a run directory lists them all")
