"""Command-line options declared once, on the settings dataclasses they fill.

Each field of a settings dataclass (``TrainSettings``, ``QuantSettings``, ``BenchSettings``) is
one option: its name gives the flag (``rank`` → ``--rank``), its type the parsing and choices,
its default the option's default, and ``field(metadata=...)`` the rest:

- ``help``: the help text (``--help`` appends the default);
- ``flag``: the flag where it is not the field's name (``learning_rate`` → ``--lr``);
- ``choices``: allowed values of a field typed ``int`` or ``str`` (a ``Literal`` type gives
  its own);
- ``metavar``: how the value is shown in ``--help``; for a tuple of pairs, also the words of
  the error message (``MODULE=SIZE`` → ``'x' is not module=size``).

Types: ``bool`` gives ``--x/--no-x``; ``Literal[...]`` choices; ``int``, ``float``, ``str``
and ``X | None`` their value; ``tuple[T, ...]`` or ``list[T]`` a comma-separated list;
``tuple[tuple[str, T], ...]`` ``name=value`` pairs; a list or a ``Literal`` either one. Lists
and pairs stay text in the parsed arguments and become the field's type in
:func:`settings_from`, so a malformed value is an :class:`EdgeftError` that the CLI reports in
one line, like every other invalid setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

from edgeft.errors import EdgeftError

# CPU threads of every command and library function that takes them. A fixed number, not the
# machine's core count, so that a command's timings compare across laptops, CI runners and
# servers; 2 because the int4 recipe was tuned and benchmarks/README.md measured at 2 threads, and
# a 2-core runner or an iPhone's two performance cores have no more (a device profile sets its own).
DEFAULT_THREADS = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that shows every option's default, wrapping descriptions as argparse does.

    Left without one: a help text that already words its default (``(default: ...)``), an
    option whose default is ``None`` (its help says what leaving it out does), a repeatable
    option that starts empty, and an on/off flag such as ``--force`` (giving it is the change).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "(default" in text
            or action.default is None
            or action.default is argparse.SUPPRESS
            or action.default == []
            or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))
        ):
            return text
        return super()._get_help_string(action)


@dataclasses.dataclass(frozen=True)
class _Option:
    """One settings field as a command-line option."""

    name: str  # the field's name, also the parsed argument's dest
    flag: str
    kwargs: dict[str, Any]
    # the parsed value (text for lists and pairs) → the field's value
    convert: Callable[[Any], Any]


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    settings_class: type,
    *,
    only: Iterable[str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one option per field of ``settings_class`` to ``parser`` (or an argument group).

    Args:
        parser: where the options go.
        settings_class: a dataclass whose fields carry the options' help in their metadata.
        only: these fields alone, in this order (default: every field, in field order).
        defaults: defaults that differ from the dataclass's for this command, by field name.

    Raises:
        TypeError: a field type that has no command-line form (a bug in the dataclass).
    """
    for option in _options(settings_class, only, defaults or {}):
        parser.add_argument(option.flag, dest=option.name, **option.kwargs)


def settings_from(args: argparse.Namespace, settings_class: type, **values: Any):
    """The ``settings_class`` instance that parsed ``args`` describe.

    Fields without an option in ``args`` keep the dataclass default; ``values`` override both.

    Raises:
        EdgeftError: a list or pair option that does not parse, or whatever the dataclass's
            own validation raises.
    """
    parsed = vars(args)
    for option in _options(settings_class, None, {}):
        if option.name in parsed and option.name not in values:
            values[option.name] = option.convert(parsed[option.name])
    return settings_class(**values)


def _options(settings_class: type, only, defaults: dict[str, Any]) -> list[_Option]:
    hints = typing.get_type_hints(settings_class)
    by_name = {f.name: f for f in dataclasses.fields(settings_class)}
    names = list(only) if only is not None else list(by_name)
    return [_option(by_name[n], hints[n], defaults.get(n, _default(by_name[n]))) for n in names]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{f.name}: a settings field needs a default to be a command-line option")


def _option(f: dataclasses.Field, hint: Any, default: Any) -> _Option:
    meta = f.metadata
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    kwargs: dict[str, Any] = {"help": meta.get("help")}
    kwargs.update((k, meta[k]) for k in ("choices", "metavar") if k in meta)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if _is_union(hint) and len(args) == 1:  # X | None: an X, or left out
        hint = args[0]
        args = list(typing.get_args(hint))
    origin = typing.get_origin(hint)

    if hint is bool:
        kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        return _Option(f.name, flag, kwargs, _same)
    if origin is Literal:
        choices = typing.get_args(hint)
        kwargs.update(type=type(choices[0]), choices=choices, default=default)
        return _Option(f.name, flag, kwargs, _same)
    if hint in (int, float, str):
        kwargs.update(type=hint, default=default)
        return _Option(f.name, flag, kwargs, _same)
    if origin in (tuple, list) and _is_pairs(hint):
        value_type = typing.get_args(typing.get_args(hint)[0])[1]
        pair = meta.get("metavar", "NAME=VALUE")
        text = ",".join(f"{name}={value}" for name, value in default)
        kwargs.update(default=text, metavar=f"{pair},...")
        return _Option(f.name, flag, kwargs, _pairs(flag, value_type, pair.lower(), text))
    if origin in (tuple, list) and _is_items(hint):
        item = typing.get_args(hint)[0]
        text = ",".join(map(str, default))
        kwargs["default"] = text
        return _Option(f.name, flag, kwargs, _items(flag, item, origin, text))
    if _is_union(hint):  # a list, or one of a Literal's words: "all-linear" or q_proj,v_proj
        words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        lists = [a for a in args if typing.get_origin(a) in (tuple, list) and _is_items(a)]
        if words and len(lists) == 1 and len(args) == 2:
            item, kind = typing.get_args(lists[0])[0], typing.get_origin(lists[0])
            as_items = _items(flag, item, kind, ",".join(words))
            kwargs.update(default=default if isinstance(default, str) else ",".join(default))
            return _Option(f.name, flag, kwargs, lambda v: v if v in words else as_items(v))
    raise TypeError(f"{f.name}: no command-line form for the type {hint}")


def _same(value: Any) -> Any:
    return value


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_items(hint: Any) -> bool:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and (len(args) != 2 or args[1] is not Ellipsis):
        return False
    return bool(args) and args[0] in (int, float, str)


def _is_pairs(hint: Any) -> bool:
    args = typing.get_args(hint)
    if not args or typing.get_origin(args[0]) is not tuple:
        return False
    pair = typing.get_args(args[0])
    return len(pair) == 2 and pair[0] is str and pair[1] in (int, float, str)


def _items(flag: str, item: type, kind: type, example: str) -> Callable[[Any], Any]:
    """``"a,b"`` → ``("a", "b")`` (or a list), each item converted to ``item``."""

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return kind(item(p) for p in parts)
        except ValueError:
            like = f" like {example}" if example else ""
            raise EdgeftError(
                f"{flag}: expected comma-separated {_TYPE_WORDS[item]}{like}; got {value!r}"
            ) from None

    return convert


def _pairs(flag: str, value_type: type, words: str, example: str) -> Callable[[Any], Any]:
    """``"gate_proj=64,up_proj=64"`` → ``(("gate_proj", 64), ("up_proj", 64))``."""
    first = example.split(",")[0]

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        pairs = []
        for part in (p.strip() for p in value.split(",") if p.strip()):
            name, sep, raw = (s.strip() for s in part.partition("="))
            try:
                if not (name and sep and raw):
                    raise ValueError(part)
                pairs.append((name, value_type(raw)))
            except ValueError:
                example = f" (e.g. {first})" if first else ""
                raise EdgeftError(f"{flag}: {part!r} is not {words}{example}") from None
        return tuple(pairs)

    return convert


_TYPE_WORDS = {int: "integers", float: "numbers", str: "names"}
