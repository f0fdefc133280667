"""Typed dataclasses as schemas: declare fields with their documentation and limits, fill them
from YAML, command-line text or typed values, check them, explain them.

::

    @dataclass
    class Train:
        lr: float = field_(1e-4, "peak learning rate", above(0, "a positive learning rate"))

    obj = build(Train, {"lr": 3e-4}, source="my.yaml")   # ConfigError listing every problem
    set_value(obj, "lr", "2e-4", problems, text=True)     # a command-line override
    value_problems(obj)                                    # [] or ["lr: -1.0; expected ..."]
    print(format_explained(explain(Train)))                # `slurmtune config --explain`

The run manifest (slurmtune.config) and the cluster profiles (slurmtune.cluster.profiles)
are such schemas. One setter serves every source, so a manifest, the command line and a
sweep report an unknown key or a wrong type in the same words.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import json
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from slurmtune.errors import ConfigError, UsageError


# libyaml's loader when present: 10x faster than the pure-Python one, same results.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: same text, ~10x faster


@dataclass(frozen=True)
class Rule:
    """A constraint on one field's value: ``test(value, section)``, and what it expects, in words."""

    test: Callable[[Any, Any], bool]
    expected: str  # the fix, as it ends a problem: "...; expected 1 or more"
    unless: str = ""  # when the rule is lifted, in words (for explain)
    problem: str = "{key}: {value}; expected {expected}"
    explained: str = ""  # the rule for explain, when ``expected`` alone does not say it

    def describe(self) -> str:
        text = self.explained or self.expected
        return f"{text} (unless {self.unless})" if self.unless else text


def at_least(low, expected: str | None = None, unless: str | None = None) -> Rule:
    """value >= low; ``unless`` names a boolean field of the same section that lifts the rule."""
    return Rule(lambda v, s: v >= low or bool(unless and getattr(s, unless)),
                expected or f"{low} or more", unless or "")


def above(low, expected: str | None = None) -> Rule:
    return Rule(lambda v, s: v > low, expected or f"more than {low}")


def share(expected: str = "a share in [0, 1)", zero: bool = True) -> Rule:
    """0 <= value < 1 (``zero=False``: 0 < value < 1)."""
    return Rule(lambda v, s: (0 <= v if zero else 0 < v) and v < 1, expected)


def non_empty(expected: str) -> Rule:
    return Rule(lambda v, s: bool(v), expected, problem="{key}: empty; expected {expected}",
                explained=f"a non-empty value: {expected}")


def field_(default: Any = MISSING, doc: str = "", *rules: Rule, path: bool = False):
    """A schema field with its documentation, its constraints, and (``path=True``) whether it
    holds filesystem paths, resolved against the folder of the file that sets them. A list or
    dict default is copied for each instance."""
    metadata = {"doc": doc, "rules": rules, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls):
    """A field holding a whole section; its documentation is the section class's docstring."""
    return field(default_factory=cls, metadata={"doc": section_doc(cls)})


def section_doc(cls) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):
        return ""  # the signature dataclasses write for a class without a docstring
    return " ".join(inspect.cleandoc(doc).split())


def build(cls, raw: Any, source: str, base: Path | None = None):
    """Any schema dataclass from a plain mapping: types and values checked, every problem at once."""
    problems: list[str] = []
    obj = fill(cls(), raw, problems, base)
    problems += value_problems(obj) if not problems else []
    if problems:
        raise ConfigError(problems, source=source)
    return obj


def fill(obj, raw: Any, problems: list[str], base: Path | None, prefix: str = ""):
    """Set ``obj``'s fields from a (nested) mapping; returns ``obj``."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'top level'}: expected a mapping, got {_show(raw)}")
        return obj
    for name, value in raw.items():
        _set_field(obj, str(name), value, prefix, problems, base)
    return obj


def set_value(obj, key: str, value: Any, problems: list[str], base: Path | None = None,
              text: bool = False) -> None:
    """Set one field by dotted key (``train.lr``), checked like a manifest: an unknown key names
    the close match and the valid keys. ``text=True``: ``value`` is command-line text, read by the
    field's type (strings stay as typed, the rest is YAML). Relative paths resolve against ``base``.
    Past a mapping field the rest of the key names one entry (``data.options.clean_replacement``)."""
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        fields, prefix = _fields(type(obj)), "".join(p + "." for p in parts[:i])
        if part not in fields:
            problems.append(_unknown_key(prefix, part, fields))
            return
        hint = _type_hints(type(obj))[part]
        if typing.get_origin(_strip_optional(hint)) is dict and isinstance(getattr(obj, part), dict):
            _set_entry(getattr(obj, part), ".".join(parts[i + 1:]), value, prefix + part, hint, problems, text)
            return
        if not dataclasses.is_dataclass(hint):
            problems.append(f"{key}: '{prefix}{part}' has no sub-keys")
            return
        obj = getattr(obj, part)
    _set_field(obj, parts[-1], value, "".join(p + "." for p in parts[:-1]), problems, base, text)


def _set_entry(mapping: dict, entry: str, value: Any, key: str, hint, problems: list[str], text: bool) -> None:
    item = typing.get_args(_strip_optional(hint))[1]
    value = _read_text(value, item) if text else value
    if item is str and isinstance(value, bool):
        value = "true" if value else "false"  # `chat: true` in YAML, for an option read as text
    ok, converted = _check(value, item)
    if ok:
        mapping[entry] = converted
    else:
        problems.append(f"{key}.{entry}: {_show(value)} is not {_type_name(item)}")


def _set_field(obj, name: str, value: Any, prefix: str, problems: list[str], base: Path | None,
               text: bool = False) -> None:
    fields, key = _fields(type(obj)), prefix + name
    if name not in fields:
        problems.append(_unknown_key(prefix, name, fields))
        return
    hint = _type_hints(type(obj))[name]
    if text:
        value = _read_text(value, hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            fill(getattr(obj, name), value, problems, base, key + ".")
        else:
            problems.append(f"{key}: is a section; expected a mapping of its keys "
                            f"(e.g. {key}.{dataclasses.fields(hint)[0].name}), got {_show(value)}")
        return
    if typing.get_origin(_strip_optional(hint)) is dict and isinstance(value, dict):
        entries: dict = {}
        for entry, item in value.items():  # each entry checked on its own, named in its problem
            _set_entry(entries, str(entry), item, key, hint, problems, False)
        value = entries
    ok, converted = _check(value, hint)
    if not ok:
        problems.append(f"{key}: {_show(value)} is not {_type_name(hint)}")
        return
    if fields[name].metadata.get("path") and base is not None:
        converted = _resolve(converted, base)
    setattr(obj, name, converted)


def _key_problem(cls, parents: list[str], key: str) -> str | None:
    """What is wrong with the sections ``parents`` of a dotted key, or None."""
    for i, part in enumerate(parents):
        fields = _fields(cls)
        if part not in fields:
            return _unknown_key("".join(p + "." for p in parents[:i]), part, fields)
        cls = _type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            return f"{key}: '{'.'.join(parents[:i + 1])}' has no sub-keys"
    return None


def _unknown_key(prefix: str, key: str, fields) -> str:
    section = prefix.rstrip(".") or "top level"
    hint = difflib.get_close_matches(key, fields, n=1)
    maybe = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"{prefix}{key}: unknown key{maybe}; valid keys of {section}: {', '.join(fields)}"


def _read_text(text: str, hint) -> Any:
    """Strings stay as typed; everything else is read as YAML (numbers, lists, null)."""
    if _is_optional(hint) and text.strip().lower() in ("null", "none", "~", ""):
        return None
    core = _strip_optional(hint)
    if core is str or typing.get_origin(core) is Literal:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _resolve(value, base: Path):
    if value in (None, ""):
        return value
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.dump(to_dict(cfg), Dumper=SAFE_DUMPER, sort_keys=False, default_flow_style=False)


def value_problems(obj, prefix: str = "") -> list[str]:
    """Every value of ``obj`` (and its sections) that breaks its field's constraints, each as
    ``key: value; expected ...``. A null (optional) value means "the default" and passes."""
    problems = []
    hints = _type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            problems += value_problems(value, key + ".")
            continue
        for rule in f.metadata.get("rules", ()):
            if value is not None and not _passes(rule, value, obj):
                problems.append(rule.problem.format(key=key, prefix=prefix, value=_show_value(value),
                                                    expected=rule.expected))
    return problems


def _passes(rule: Rule, value, section) -> bool:
    try:
        return rule.test(value, section)
    except (TypeError, ValueError):  # a value of the wrong type, set in code past the type checks
        return False


@dataclass
class FieldDoc:
    key: str
    type: str
    default: Any
    expected: str  # the constraints, "" when any value of the type is fine
    doc: str


def field_docs(cls, prefix: str = "") -> list[FieldDoc]:
    """Every plain field of ``cls`` (not its sections), documented from the schema."""
    hints, docs = _type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        rules = f.metadata.get("rules", ())
        kind = _type_name(hints[f.name])
        if f.metadata.get("path"):
            kind = kind.replace("string", "path")
        docs.append(FieldDoc(prefix + f.name, kind, default,
                             "; ".join(r.describe() for r in rules), f.metadata.get("doc", "")))
    return docs


def sections(cls, prefix: str = "", doc: str = "") -> list[tuple[str, str, list[FieldDoc]]]:
    """(name, doc, fields) of ``cls``'s own fields, then of each section, depth first."""
    found = [(prefix.rstrip(".") or "top level", doc or section_doc(cls), field_docs(cls, prefix))]
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += sections(hints[f.name], prefix + f.name + ".", f.metadata.get("doc", ""))
    return [s for s in found if s[2]]


def explain(cls, key: str | None = None) -> list[tuple[str, str, list[FieldDoc]]]:
    """The sections to show for ``key``: all (None), one section, or one field (its section's
    name, no doc). An unknown key raises the same message a manifest gets."""
    if not key:
        return sections(cls)
    *parents, last = key.strip().split(".")
    problem = _key_problem(cls, parents, key)
    if problem:
        raise UsageError(problem)
    owner = cls
    for part in parents:
        owner = _type_hints(owner)[part]
    fields, prefix = _fields(owner), "".join(p + "." for p in parents)
    if last not in fields:
        raise UsageError(_unknown_key(prefix, last, fields))
    hint = _type_hints(owner)[last]
    if dataclasses.is_dataclass(hint):
        return sections(hint, prefix + last + ".", fields[last].metadata.get("doc", ""))
    return [(prefix.rstrip(".") or "top level", "", [d for d in field_docs(owner, prefix) if d.key == key.strip()])]


def format_explained(groups: list[tuple[str, str, list[FieldDoc]]], width: int = 100) -> str:
    """``[section] doc`` headers, then per field ``key: type; default D; expected E`` and its doc."""
    blocks = []
    for name, doc, docs in groups:
        lines = [f"[{name}] {doc}".rstrip()] if doc else []
        for d in docs:
            lines.append(f"{d.key}: {d.type}; default {_literal(d.default)}"
                         + (f"; expected {d.expected}" if d.expected else ""))
            lines += textwrap.wrap(d.doc, width, initial_indent="    ", subsequent_indent="    ")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def explained_json(groups: list[tuple[str, str, list[FieldDoc]]]) -> str:
    return json.dumps([dataclasses.asdict(d) for _, _, docs in groups for d in docs], indent=2)


def _literal(value: Any) -> str:
    """A default as a manifest would spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the string annotations: slow, so once per class


@functools.cache
def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _is_optional(hint) -> bool:
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _strip_optional(hint):
    if _is_optional(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return hint


def _check(value: Any, hint) -> tuple[bool, Any]:
    """(ok, value converted to the field's type). ints widen to float; YAML's '1e-4' string too."""
    if _is_optional(hint):
        if value is None:
            return True, None
        hint = _strip_optional(hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        return (value in typing.get_args(hint)), value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [str(value)]  # a single value where a list is expected
        if not isinstance(value, list):
            return False, value
        checked = [_check(v, item) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            return False, value
        checked = {str(k): _check(v, item) for k, v in value.items()}
        return all(ok for ok, _ in checked.values()), {k: v for k, (_, v) in checked.items()}
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    return False, value


def _type_name(hint) -> str:
    if _is_optional(hint):
        return _type_name(_strip_optional(hint)) + " or null"
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        item = _type_name(typing.get_args(hint)[0])
        if item.startswith("one of "):
            return f"a list of {item.removeprefix('one of ')}"
        return f"a list of {item.removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if hint is Any:
        return "a value"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number",
            str: "a string"}.get(hint, str(hint))


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _show_value(value: Any) -> str:
    """A value in a constraint problem: numbers as written (``-1.0``), strings quoted."""
    return repr(value) if isinstance(value, str) else str(value)
