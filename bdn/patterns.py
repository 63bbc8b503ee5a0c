"""Glob patterns for ``allow_patterns`` / ``ignore_patterns``, as the ecosystem means them.

A pattern selects a file when it matches the file's whole ``/``-separated relative path
with the meaning of ``huggingface_hub``'s ``filter_repo_objects`` (and truss-transfer,
which follows it), i.e. Python's ``fnmatch.fnmatchcase``: ``*`` matches any run of
characters *including* ``/`` (so ``*.json`` selects ``config.json`` and
``sub/config.json``), ``?`` any one character, ``[...]`` a character class (``[!...]``
negated; ``]`` first is a member; a class may match ``/``). ``**`` is no different from
``*``. A pattern ending in ``/`` selects everything below that folder (``sub/`` means
``sub/*``), and a backslash is a path separator in patterns and paths alike. A user who
writes the same ``weights:`` entry for Truss and for bdn gets the same files.

(bdn once had ``*`` stop at ``/``, as shells do; that rule was reversed so that configs
mean the same thing everywhere. :func:`bdn.mirror_key.mirror_key` records the change for
entries with patterns, so a mirror made under the old rule is not reused.)

Patterns come from users of a shared service, so matching must cost time linear in the
path whatever the pattern: a pattern is compiled once into a list of tokens and matched
by simulating the automaton over the set of live token positions (Thompson's method),
never by backtracking. A path of ``n`` characters against a pattern of ``m`` tokens costs
at most ``O(n × m)`` steps. A character class is translated by ``fnmatch`` itself (so its
ranges, escapes and negation are exactly fnmatch's) into a one-character regular
expression, which cannot backtrack. :func:`compile_glob` refuses what is almost surely a
typo and can never select what the user meant — a class that is empty (``[z-a]``) or
unterminated (``a[bc``, ``[!]``), which fnmatch would quietly treat as matching nothing
or as a literal ``[`` — and patterns past a length bound, so a config or a service can
reject them when they arrive (:func:`bdn.config.parse_weights` does). Pure.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

from bdn.errors import ConfigError

MAX_PATTERN_CHARS = 1024
MAX_PATTERNS = 256  # per allow_patterns / ignore_patterns list

# Token kinds. ``LIT``/``ANY``/``CLASS`` consume one character; ``STAR`` any run at all.
_LIT, _ANY, _CLASS, _STAR = range(4)
_EMPTY_CLASS = "(?!)"  # what fnmatch.translate makes of a class that matches nothing

_Token = tuple[int, object]


class PatternError(ConfigError):
    """A glob pattern cannot be compiled; names the pattern and what is wrong."""


def _quote(pattern: str) -> str:
    return repr(pattern if len(pattern) <= 60 else pattern[:60] + "…")


def normalize_pattern(pattern: str) -> str:
    """``pattern`` as ``filter_repo_objects`` uses it: ``\\`` is ``/``, and a trailing
    ``/`` means everything below."""
    pattern = pattern.replace("\\", "/")
    return pattern + "*" if pattern.endswith("/") else pattern


def _class_end(pattern: str, i: int) -> int:
    """Index of the ``]`` closing the class opened at ``pattern[i]``, or -1 (fnmatch's
    rule: a ``!`` and then a ``]`` right after the ``[`` are members, not the end)."""
    j = i + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    return pattern.find("]", j)


@lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> tuple[_Token, ...]:
    """The token list of ``pattern``; :class:`PatternError` when it cannot be compiled."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"pattern of {len(pattern)} characters is longer than "
                           f"{MAX_PATTERN_CHARS}: {_quote(pattern)}")
    norm = normalize_pattern(pattern)
    out: list[_Token] = []
    i, n = 0, len(norm)
    while i < n:
        c = norm[i]
        if c == "*":
            if not out or out[-1][0] != _STAR:  # "**" matches what "*" does
                out.append((_STAR, None))
            i += 1
        elif c == "?":
            out.append((_ANY, None))
            i += 1
        elif c == "[":
            j = _class_end(norm, i)
            if j < 0:
                raise PatternError(f"pattern {_quote(pattern)} has an unterminated "
                                   f"character class at offset {i}")
            body = norm[i:j + 1]
            rx = fnmatch.translate(body)
            if _EMPTY_CLASS in rx:
                raise PatternError(f"pattern {_quote(pattern)} has an empty character "
                                   f"range {body[1:-1]}")
            out.append((_CLASS, re.compile(rx)))
            i = j + 1
        else:
            out.append((_LIT, c))
            i += 1
    return tuple(out)


def _closure(tokens: Sequence[_Token], states: Iterable[int]) -> set[int]:
    """``states`` plus every position reachable without consuming a character: a ``*``
    may match nothing."""
    out: set[int] = set()
    stack = list(states)
    while stack:
        s = stack.pop()
        if s in out:
            continue
        out.add(s)
        if s < len(tokens) and tokens[s][0] == _STAR:
            stack.append(s + 1)
    return out


def _match(tokens: tuple[_Token, ...], path: str) -> bool:
    end = len(tokens)
    states = _closure(tokens, [0])
    for c in path.replace("\\", "/"):
        nxt: set[int] = set()
        for s in states:
            if s == end:
                continue
            kind, arg = tokens[s]
            if kind == _LIT:
                if c == arg:
                    nxt.add(s + 1)
            elif kind == _ANY:
                nxt.add(s + 1)
            elif kind == _CLASS:
                if arg.match(c):  # type: ignore[attr-defined]
                    nxt.add(s + 1)
            else:  # _STAR
                nxt.add(s)
        if not nxt:
            return False
        states = _closure(tokens, nxt)
    return end in states


def matches(path: str, pattern: str) -> bool:
    return _match(compile_glob(pattern), path)


def select(paths: Iterable[str], allow: Sequence[str] | None = None,
           ignore: Sequence[str] | None = None) -> list[str]:
    """Paths matching any ``allow`` pattern (all when none given) and no ``ignore`` one."""
    allow_t = [compile_glob(a) for a in allow or ()]
    ignore_t = [compile_glob(g) for g in ignore or ()]
    out = []
    for p in paths:
        if allow_t and not any(_match(a, p) for a in allow_t):
            continue
        if ignore_t and any(_match(g, p) for g in ignore_t):
            continue
        out.append(p)
    return out
