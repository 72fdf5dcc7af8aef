"""Reading the small text files rulesearch is given (configs, rules, run files) with one clear error per fault.

Every failure (missing, a directory, unreadable, not UTF-8, malformed or absurdly nested JSON, integers of thousands
of digits) raises the caller's :class:`~rulesearch.errors.RuleSearchError` subclass naming the file, the problem and
``fix``, never a raw ``OSError``, ``UnicodeDecodeError`` or ``RecursionError``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rulesearch.errors import RuleSearchError

__all__ = ["read_text", "parse_json", "read_json"]

MAX_JSON_DEPTH = 100  # rules, configs and manifests nest a few dozen levels at most


def read_text(path: str | os.PathLike, what: str, error: type[RuleSearchError], fix: str) -> str:
    """The UTF-8 text of ``path`` (``what`` names it in messages, e.g. "Config file")."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} does not exist. {fix}") from None
    except IsADirectoryError:
        raise error(f"{what} {str(path)!r} is a directory, not a file. {fix}") from None
    except OSError as err:
        raise error(f"{what} {str(path)!r} cannot be read ({err.strerror or err}). {fix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(
            f"{what} {str(path)!r} is not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}). {fix}"
        ) from None


def _depth(text: str) -> int:
    """The deepest nesting of JSON arrays and objects in ``text`` (brackets inside strings are skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, where: str, error: type[RuleSearchError], fix: str) -> Any:
    """``json.loads(text)``; ``where`` names the source in messages (e.g. "Rule file 'x.json'")."""
    if _depth(text) > MAX_JSON_DEPTH:
        raise error(
            f"{where} nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; it is not a rulesearch file. {fix}"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{where} is not valid JSON: {err}. {fix}") from None
    except (ValueError, RecursionError) as err:
        problem = "an integer of more than 4300 digits" if "integer string conversion" in str(err) else str(err)
        raise error(f"{where} cannot be read: it holds {problem}. {fix}") from None


def read_json(path: str | os.PathLike, what: str, error: type[RuleSearchError], fix: str) -> Any:
    """The JSON value in ``path`` (see :func:`read_text` and :func:`parse_json`)."""
    return parse_json(read_text(path, what, error, fix), f"{what} {str(path)!r}", error, fix)
