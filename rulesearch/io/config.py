"""Strict, serializable configuration: nested frozen dataclasses with documented fields.

A configuration is a frozen dataclass whose fields are declared with :func:`option` (or ``dataclasses.field``
with ``metadata={"help": ..., "choices": ...}``). Sections nest: a field whose type is another config
dataclass, reached from overrides with dotted keys (``"inner.lr=0.1"``). Subclassing :class:`Config` adds the
methods and validates types and choices at construction.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Inner(Config):
...     lr: float = option(0.1, help="Inner-loop learning rate.")
...     mode: str = option("fa", help="Feedback pathway.", choices=("bp", "fa", "dfa"))
...     sizes: tuple[int, ...] = option((784, 100, 10), help="Layer sizes.")
>>> Inner().to_dict()
{'lr': 0.1, 'mode': 'fa', 'sizes': [784, 100, 10]}
>>> Inner.from_dict({"lr": 1, "sizes": [4, 2]})
Inner(lr=1.0, mode='fa', sizes=(4, 2))
>>> apply_overrides(Inner(), ["lr=0.5", "mode=dfa"])
Inner(lr=0.5, mode='dfa', sizes=(784, 100, 10))
>>> Inner.from_dict({"lrr": 0.5})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
rulesearch.errors.ConfigError: Unknown key 'lrr' in config Inner. Did you mean 'lr'? Valid keys: ...
>>> Inner(mode="dfx")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
rulesearch.errors.ConfigError: Config key 'Inner.mode': received 'dfx', expected one of ... 'dfa'?

Rules
-----
- ``to_dict`` gives plain JSON/YAML data: tuples become lists, paths strings, enums their values.
- ``from_dict`` rejects unknown keys (with a suggestion), values of the wrong type (naming the key, the value
  received and the type expected) and values outside declared ``choices``. An ``int`` is accepted for a
  ``float`` field; nothing else is converted implicitly (no ``bool`` for ``int``, no ``str`` for numbers).
- Renamed keys: set ``_renamed: ClassVar[dict[str, str]] = {"old": "new"}`` on the class; ``from_dict`` maps
  them with a ``FutureWarning``.
- A subclass of :class:`Config` that defines ``__post_init__`` must call ``super().__post_init__()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import re
import types
import typing
import warnings
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rulesearch.errors import ConfigError

__all__ = [
    "Config",
    "FieldDoc",
    "option",
    "to_dict",
    "from_dict",
    "replace",
    "parse_overrides",
    "apply_overrides",
    "load_config",
    "save_config",
    "dump_yaml",
    "load_yaml",
    "field_docs",
    "undocumented_fields",
]

C = TypeVar("C")
_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    choices: Iterable[Any] | None = None,
    default_factory: Any = _MISSING,
) -> Any:
    """A dataclass field carrying its help text (and optionally its allowed values) in ``metadata``.

    Parameters
    ----------
    default, default_factory
        As in :func:`dataclasses.field`; give at most one (neither makes the field required).
    help
        One sentence for ``--help`` listings; :func:`undocumented_fields` checks it is non-empty.
    choices
        Allowed values; for a tuple or list field, each element must be one of them.
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


# ----------------------------------------------------------------------------------------------- types


class _Mismatch(Exception):
    """Internal: a value does not fit a type (``detail`` locates the offending element)."""

    def __init__(self, detail: str = ""):
        super().__init__(detail)
        self.detail = detail


_HINTS: weakref.WeakKeyDictionary[type, dict[str, Any]] = weakref.WeakKeyDictionary()


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except NameError as err:
            raise TypeError(
                f"Cannot resolve the field annotations of {cls.__qualname__}: {err}. Define config classes "
                "(and the classes their annotations name) at module level."
            ) from err
        _HINTS[cls] = hints
    return hints


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against ``tp`` and normalized (list -> tuple, int -> float, dict -> dataclass)."""
    if tp is Any or tp is object:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise _Mismatch()
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        for arg in args:
            try:
                return _convert(value, arg, key)
            except _Mismatch:
                continue
        raise _Mismatch()
    if origin is typing.Literal:
        for arg in args:
            if value == arg and type(value) is type(arg):
                return arg
        raise _Mismatch()
    if origin is typing.ClassVar:
        return value
    if origin in (tuple, list, set, frozenset) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch()
        kind = origin or tp
        if kind is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(f"expected {len(args)} elements, received {len(value)}")
            elem_types = list(args)
        else:
            elem_types = [args[0] if args else Any] * len(value)
        out = []
        for i, (item, item_tp) in enumerate(zip(value, elem_types)):
            try:
                out.append(_convert(item, item_tp, f"{key}[{i}]"))
            except _Mismatch as err:
                raise _Mismatch(f"element [{i}] is {_show(item)}, expected {_type_name(item_tp)}") from err
        return kind(out)
    if origin is dict or tp is dict or origin is Mapping:
        if not isinstance(value, Mapping):
            raise _Mismatch()
        key_tp, val_tp = args if args else (Any, Any)
        out_map = {}
        for k, v in value.items():
            try:
                ck = _convert(k, key_tp, key)
            except _Mismatch as err:
                raise _Mismatch(f"key {k!r} is not {_type_name(key_tp)}") from err
            try:
                out_map[ck] = _convert(v, val_tp, f"{key}.{k}")
            except _Mismatch as err:
                raise _Mismatch(f"entry {k!r} is {_show(v)}, expected {_type_name(val_tp)}") from err
        return out_map
    if _is_config_class(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _from_dict(tp, value, key)
        raise _Mismatch("a section: give a mapping of its keys")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch()
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch()
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch()
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch()
        return value
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, (str, Path)):
            return tp(value)
        raise _Mismatch()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.value or value == member.name:
                return member
        raise _Mismatch(f"expected one of {', '.join(repr(m.value) for m in tp)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch()
    raise TypeError(
        f"Unsupported annotation {tp!r} on config key {key!r}; use plain types, unions, tuples, "
        "lists, dicts, Literal, Path, Enum or nested dataclasses."
    )


def _check_choices(value: Any, choices: tuple, key: str) -> None:
    items = (
        value
        if isinstance(value, (tuple, list)) and not any(isinstance(c, (tuple, list)) for c in choices)
        else [value]
    )
    for item in items:
        if item not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            hint = ""
            if isinstance(item, str):
                close = difflib.get_close_matches(item, [c for c in choices if isinstance(c, str)], n=1)
                if close:
                    hint = f" Did you mean {close[0]!r}?"
            raise ConfigError(f"Config key {key!r}: received {item!r}, expected one of {allowed}.{hint}")


def _check_field(value: Any, f: dataclasses.Field, tp: Any, key: str) -> Any:
    try:
        value = _convert(value, tp, key)
    except _Mismatch as err:
        detail = f" ({err.detail})" if err.detail else ""
        raise ConfigError(f"Config key {key!r}: received {_show(value)}, expected {_type_name(tp)}{detail}.") from None
    choices = f.metadata.get("choices")
    if choices is not None:
        _check_choices(value, tuple(choices), key)
    return value


def _suggest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _section(key: str, cls: type) -> str:
    return f"section {key!r} ({cls.__name__})" if key else f"config {cls.__name__}"


# --------------------------------------------------------------------------------------- dict <-> config


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/YAML-able data of a config dataclass (nested sections as dicts, tuples as lists)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"to_dict expects a dataclass instance, received {_show(cfg)}.")
    return {f.name: _plain(getattr(cfg, f.name)) for f in _init_fields(type(cfg))}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Path):
        return str(value)
    return value


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build ``cls`` (a config dataclass) from plain data, validating keys, types and choices.

    Raises
    ------
    ConfigError
        An unknown key (with the closest valid key), a missing required key, a value of the wrong type or a
        value outside the field's ``choices``.
    """
    if not _is_config_class(cls):
        raise TypeError(f"from_dict expects a dataclass type, received {cls!r}.")
    return _from_dict(cls, data, "")


def _from_dict(cls: type[C], data: Any, prefix: str) -> C:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"Config {_section(prefix, cls)} must be a mapping of keys to values, received {_show(data)}."
        )
    data = dict(data)
    for old, new in getattr(cls, "_renamed", {}).items():
        if old in data:
            if new in data:
                raise ConfigError(
                    f"Config {_section(prefix, cls)} sets both {old!r} and its new name {new!r}; keep only {new!r}."
                )
            warnings.warn(
                f"Config key {_join(prefix, old)!r} was renamed to {_join(prefix, new)!r}; update your config.",
                FutureWarning,
                stacklevel=3,
            )
            data[new] = data.pop(old)
    fields = {f.name: f for f in _init_fields(cls)}
    for name in data:
        if name not in fields:
            raise ConfigError(
                f"Unknown key {name!r} in {_section(prefix, cls)}.{_suggest(str(name), fields)} "
                f"Valid keys: {', '.join(fields)}."
            )
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(f"Config key {key!r} is required ({_type_name(hints[name])}) but missing.")
            continue
        kwargs[name] = _check_field(data[name], f, hints[name], key)
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


# ----------------------------------------------------------------------------------------------- overrides


def replace(cfg: C, **overrides: Any) -> C:
    """A copy of ``cfg`` with fields replaced; keys may be dotted (``"inner.lr"``) to reach nested sections.

    A dict given for a section updates only the keys it names. The result is validated like
    :func:`from_dict`.

    >>> # cfg.replace(**{"inner.lr": 0.1}) or replace(cfg, inner={"lr": 0.1})
    """
    data = to_dict(cfg)
    cls = type(cfg)
    for dotted, value in overrides.items():
        _set_dotted(data, cls, dotted, value)
    return from_dict(cls, data)


def _set_dotted(data: dict, cls: type, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    node_cls: Any = cls
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        last = depth == len(parts) - 1
        if node_cls is not None:
            names = [f.name for f in _init_fields(node_cls)]
            if part not in names:
                raise ConfigError(
                    f"Unknown key {_join(prefix, part)!r} in {_section(prefix, node_cls)}."
                    f"{_suggest(part, names)} Valid keys: {', '.join(names)}."
                )
            tp = _hints(node_cls)[part]
            sub_cls = _section_class(tp)
        else:
            sub_cls = None
        if last:
            if sub_cls is not None and isinstance(value, Mapping) and isinstance(node.get(part), dict):
                for k, v in value.items():
                    _set_dotted(node[part], sub_cls, str(k), v)
            else:
                node[part] = _plain(value)
            return
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(
                f"Config key {_join(prefix, part)!r} is {_show(child)}, not a section; {dotted!r} cannot be set."
            )
        node, node_cls = child, sub_cls


def _section_class(tp: Any) -> type | None:
    """The dataclass a field's annotation names (also through ``Optional``), else None."""
    if _is_config_class(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(tp) if _is_config_class(a)]
        if len(classes) == 1:
            return classes[0]
    return None


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``["inner.lr=0.1", "sizes=[4, 2]"]`` (values read as YAML) into a dict of dotted keys."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. inner.lr=0.1).")
        try:
            out[key] = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def apply_overrides(cfg: C, items: Iterable[str]) -> C:
    """``cfg`` with CLI-style ``key=value`` overrides applied (see :func:`parse_overrides`).

    A value meant for a ``str`` field is kept verbatim even if it reads as a number (``name=001``).
    """
    items = list(items)
    parsed = parse_overrides(items)
    raw = {item.partition("=")[0].strip(): item.partition("=")[2] for item in items}
    for key, value in parsed.items():
        if value is not None and not isinstance(value, str) and _accepts_str(_type_at(type(cfg), key)):
            parsed[key] = raw[key].strip()
    return replace(cfg, **parsed)


def _type_at(cls: type, dotted: str) -> Any:
    tp: Any = cls
    for part in dotted.split("."):
        sub = _section_class(tp)
        if sub is None or part not in _hints(sub):
            return None
        tp = _hints(sub)[part]
    return tp


def _accepts_str(tp: Any) -> bool:
    if tp is str or (isinstance(tp, type) and issubclass(tp, Path)):
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


# ---------------------------------------------------------------------------------------------------- files


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no Python objects), reading ``1e-3`` as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def dump_yaml(data: Any) -> str:
    """YAML text of plain data, keys in insertion order."""
    return yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise ConfigError(f"Config file {str(path)!r} has suffix {suffix!r}; expected .yaml, .yml or .json.")


def load_config(path: str | Path, cls: type[C] | None = None, *, fix: str | None = None) -> C | dict[str, Any]:
    """Read a YAML (``.yaml``, ``.yml``) or JSON (``.json``) config file: ``cls`` if given, else a dict.

    A file that cannot be read raises :class:`ConfigError` naming the problem and ``fix`` (what to do instead).
    """
    from rulesearch.io.files import parse_json, read_text

    path = Path(path)
    fmt = _format(path)
    fix = fix or "Pass a YAML or JSON file of settings (as written to config.yaml in a run directory)."
    text = read_text(path, "Config file", ConfigError, fix)
    if fmt == "json":
        data = parse_json(text, f"Config file {str(path)!r}", ConfigError, fix)
    else:
        try:
            data = load_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {err} {fix}") from None
        except (ValueError, RecursionError) as err:  # 5,000-digit integers, absurd nesting
            problem = "an integer of more than 4300 digits" if "integer string conversion" in str(err) else str(err)
            raise ConfigError(f"Config file {str(path)!r} cannot be read: it holds {problem}. {fix}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {str(path)!r} must hold a mapping at the top level, received {type(data).__name__}."
        )
    return data if cls is None else from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write a config dataclass (or a plain dict) to YAML or JSON by the file's suffix, atomically."""
    from rulesearch.io.runs import atomic_write_text

    path = Path(path)
    fmt = _format(path)
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else _plain(dict(cfg))
    text = dump_yaml(data) if fmt == "yaml" else json.dumps(data, indent=2) + "\n"
    atomic_write_text(path, text)
    return path


# ------------------------------------------------------------------------------------------ documentation


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One documented config field: dotted name, type, default, help text and allowed values."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple | None = None


def field_docs(cls: type) -> list[FieldDoc]:
    """Every field of a config dataclass, nested sections flattened to dotted names (for ``--help``)."""
    if not _is_config_class(cls):
        raise TypeError(f"field_docs expects a dataclass type, received {cls!r}.")
    out: list[FieldDoc] = []
    _collect_docs(cls, "", out)
    return out


def _collect_docs(cls: type, prefix: str, out: list[FieldDoc]) -> None:
    hints = _hints(cls)
    for f in _init_fields(cls):
        name = _join(prefix, f.name)
        if f.default is not _MISSING:
            default = _plain(f.default)
        elif f.default_factory is not _MISSING:
            default = _plain(f.default_factory())
        else:
            default = _MISSING
        choices = f.metadata.get("choices")
        out.append(
            FieldDoc(
                name,
                _type_name(hints[f.name]),
                default,
                f.metadata.get("help", ""),
                tuple(choices) if choices is not None else None,
            )
        )
        sub = _section_class(hints[f.name])
        if sub is not None:
            _collect_docs(sub, name, out)


def undocumented_fields(obj: type | types.ModuleType) -> list[str]:
    """Dotted names of fields without ``help`` text, in a config dataclass or in every dataclass of a module.

    Use it in a meta-test: ``assert undocumented_fields(rulesearch.train) == []``.
    """
    if isinstance(obj, types.ModuleType):
        classes = [v for v in vars(obj).values() if _is_config_class(v) and v.__module__ == obj.__name__]
        return [f"{c.__name__}.{name}" for c in classes for name in undocumented_fields(c)]
    return [d.name for d in field_docs(obj) if not str(d.help).strip()]


# ----------------------------------------------------------------------------------------------------- mixin


class Config:
    """Mixin for frozen config dataclasses: validation at construction plus the helpers as methods.

    Use as ``@dataclass(frozen=True) class InnerConfig(Config): ...``.
    """

    def __post_init__(self) -> None:
        cls = type(self)
        hints = _hints(cls)
        for f in _init_fields(cls):
            value = getattr(self, f.name)
            checked = _check_field(value, f, hints[f.name], f"{cls.__name__}.{f.name}")
            if checked is not value:
                object.__setattr__(self, f.name, checked)

    def to_dict(self) -> dict[str, Any]:
        """See :func:`to_dict`."""
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """See :func:`from_dict`."""
        return from_dict(cls, data)

    def replace(self: C, **overrides: Any) -> C:
        """See :func:`replace`; dotted keys go through ``**{"inner.lr": 0.1}``."""
        return replace(self, **overrides)

    @classmethod
    def field_docs(cls) -> list[FieldDoc]:
        """See :func:`field_docs`."""
        return field_docs(cls)
