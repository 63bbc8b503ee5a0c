"""Glob patterns for ``allow_patterns`` / ``ignore_patterns``.

Shell globs over ``/``-separated relative paths: ``*`` and ``?`` never cross a ``/``,
``**/`` matches zero or more whole directories, a trailing ``**`` matches everything
below, ``[...]`` is a character class. A pattern is matched against the whole
relative path, so ``*.json`` selects top-level JSON files and ``**/*.json`` selects them
at any depth (unlike ``fnmatch``, whose ``*`` crosses directories). Compiled to regular
expressions once; pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache


@lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1:j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("(?!/)[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def matches(path: str, pattern: str) -> bool:
    return compile_glob(pattern).match(path) is not None


def select(paths: Iterable[str], allow: Sequence[str] | None = None,
           ignore: Sequence[str] | None = None) -> list[str]:
    """Paths matching any ``allow`` pattern (all when none given) and no ``ignore`` one."""
    out = []
    for p in paths:
        if allow and not any(matches(p, a) for a in allow):
            continue
        if ignore and any(matches(p, g) for g in ignore):
            continue
        out.append(p)
    return out
