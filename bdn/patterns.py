"""Glob patterns for ``allow_patterns`` / ``ignore_patterns``.

Shell globs over ``/``-separated relative paths: ``*`` and ``?`` never cross a ``/``,
``**/`` matches zero or more whole directories, a trailing ``**`` matches everything
below, ``[...]`` is a character class (``[!...]`` negated; a class never matches ``/``).
A pattern is matched against the whole relative path, so ``*.json`` selects top-level
JSON files and ``**/*.json`` selects them at any depth (unlike ``fnmatch``, whose ``*``
crosses directories).

Patterns come from users of a shared service, so matching must cost time linear in the
path whatever the pattern: a pattern is compiled once into a list of tokens and matched
by simulating the automaton over the set of live token positions (Thompson's method),
never by backtracking. A path of ``n`` characters against a pattern of ``m`` tokens costs
at most ``O(n × m)`` steps — where ``"**/" * 300`` as a regular expression would never
finish, and would hold the GIL while it tried. :func:`compile_glob` refuses what
cannot be compiled (an empty range ``[z-a]``, an unterminated class ``[!]``) and
patterns past a length bound, so a config or a service can reject them when they
arrive (:func:`bdn.config.parse_weights` does). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from bdn.errors import ConfigError

MAX_PATTERN_CHARS = 1024
MAX_PATTERNS = 256  # per allow_patterns / ignore_patterns list

# Token kinds. ``LIT``/``ANY``/``CLASS`` consume one character; ``STAR`` any run of
# non-``/``; ``DSTAR`` any run at all; ``DIRS`` (``**/``) zero or more ``<segment>/``.
_LIT, _ANY, _CLASS, _STAR, _DSTAR, _DIRS = range(6)


@dataclass(frozen=True, slots=True)
class _Class:
    negated: bool
    ranges: tuple[tuple[str, str], ...]

    def matches(self, c: str) -> bool:
        if c == "/":
            return False
        hit = any(lo <= c <= hi for lo, hi in self.ranges)
        return hit != self.negated


_Token = tuple[int, object]


class PatternError(ConfigError):
    """A glob pattern cannot be compiled; names the pattern and what is wrong."""


def _parse_class(body: str, pattern: str) -> _Class:
    # "^" negates too: these globs were once compiled to regular expressions, where it
    # did, and patterns written then keep their meaning.
    negated = body[:1] in ("!", "^")
    if negated:
        body = body[1:]
    ranges: list[tuple[str, str]] = []
    i = 0
    while i < len(body):
        c = body[i]
        # "a-z" is a range unless the "-" is last (then it is a literal "-").
        if i + 2 < len(body) and body[i + 1] == "-":
            hi = body[i + 2]
            if hi < c:
                raise PatternError(f"pattern {_quote(pattern)} has an empty character "
                                   f"range {c}-{hi}")
            ranges.append((c, hi))
            i += 3
        else:
            ranges.append((c, c))
            i += 1
    return _Class(negated, tuple(ranges))


def _quote(pattern: str) -> str:
    return repr(pattern if len(pattern) <= 60 else pattern[:60] + "…")


@lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> tuple[_Token, ...]:
    """The token list of ``pattern``; :class:`PatternError` when it cannot be compiled."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"pattern of {len(pattern)} characters is longer than "
                           f"{MAX_PATTERN_CHARS}: {_quote(pattern)}")
    out: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            if not out or out[-1][0] != _DIRS:  # "**/**/" matches what "**/" does
                out.append((_DIRS, None))
            i += 3
        elif pattern.startswith("**", i):
            out.append((_DSTAR, None))
            i += 2
        elif c == "*":
            if not out or out[-1][0] != _STAR:
                out.append((_STAR, None))
            i += 1
        elif c == "?":
            out.append((_ANY, None))
            i += 1
        elif c == "[":
            # "]" right after "[" or "[!" is a member, not the end (as in shells).
            j = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if pattern[i + 1:i + 3] == "!]":
                j = pattern.find("]", i + 3)
            if j < 0:
                raise PatternError(f"pattern {_quote(pattern)} has an unterminated "
                                   f"character class at offset {i}")
            out.append((_CLASS, _parse_class(pattern[i + 1:j], pattern)))
            i = j + 1
        else:
            out.append((_LIT, c))
            i += 1
    return tuple(out)


def _closure(tokens: Sequence[_Token], states: Iterable[int]) -> set[int]:
    """``states`` plus every position reachable without consuming a character: a
    ``*``, ``**`` or ``**/`` may match nothing."""
    out: set[int] = set()
    stack = list(states)
    while stack:
        s = stack.pop()
        if s in out:
            continue
        out.add(s)
        if 0 <= s < len(tokens) and tokens[s][0] in (_STAR, _DSTAR, _DIRS):
            stack.append(s + 1)
    return out


def _match(tokens: tuple[_Token, ...], path: str) -> bool:
    end = len(tokens)
    # A state is a token position; for "**/" a second state (-1 - pos) means "inside a
    # directory name", from which only a "/" leads back to the position itself.
    states = _closure(tokens, [0])
    for c in path:
        nxt: set[int] = set()
        for s in states:
            if s < 0:
                pos = -1 - s
                nxt.add(pos if c == "/" else s)
                continue
            if s == end:
                continue
            kind, arg = tokens[s]
            if kind == _LIT:
                if c == arg:
                    nxt.add(s + 1)
            elif kind == _ANY:
                if c != "/":
                    nxt.add(s + 1)
            elif kind == _CLASS:
                if arg.matches(c):  # type: ignore[attr-defined]
                    nxt.add(s + 1)
            elif kind == _STAR:
                if c != "/":
                    nxt.add(s)
            elif kind == _DSTAR:
                nxt.add(s)
            elif kind == _DIRS:
                nxt.add(s if c == "/" else -1 - s)
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
