"""The one parser of byte sizes and byte rates, for every flag and setting.

``512M``, ``10GiB``, ``1.5G``, ``3 MB``, ``4096`` → bytes. The units are binary, as
every size bdn prints is (:func:`bdn.progress.human_bytes`): ``K``/``M``/``G``/``T`` are
KiB/MiB/GiB/TiB, and ``KiB``, ``KB`` and ``K`` (any case) are the same unit — before
this module the agent's and the cache server's flags each had a parser, both binary, so
that is the meaning operators already rely on. Kubernetes quantities in ``config.yaml``
(``resources.memory: 16Gi``/``16G``, decimal without the ``i``) are another format with
their own parser (:func:`control.resources.parse_memory`), because Truss defines them.

The value is computed exactly (:class:`fractions.Fraction`, not float), so
``1.1M`` is the same number on every machine, and a fraction of a byte is rounded down.
Junk (``ten``, ``5X``, ``-1``, ``1e9``, ``nan``) is refused with a message that names
the flag or variable; :func:`byte_size_arg` adapts it to argparse, which prefixes the
flag's name itself.
"""

from __future__ import annotations

import argparse
import re
from fractions import Fraction

from bdn.errors import ConfigError

# One power of 1024 per unit letter; "B" alone (or nothing) is bytes.
UNIT_BYTES: dict[str, int] = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
                              "t": 1 << 40}
# Larger than any file system or link rate bdn meets; refusing it catches a wrong unit
# (or a pasted digest) before it becomes a budget nothing can reach.
MAX_BYTE_SIZE_BYTES = (1 << 63) - 1
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*",
                      re.IGNORECASE)
EXAMPLES = "e.g. 4096, 512M, 10GiB, 1.5G"


def parse_byte_size(text: str, *, name: str = "") -> int:
    """Bytes that ``text`` names (binary units, see the module docstring).

    ``name`` (a flag such as ``--budget-bytes`` or a variable such as ``BDN_X``) is
    named by the :class:`ConfigError` a bad value raises.
    """
    m = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(f"not a byte size: {text!r} ({EXAMPLES}; units are binary: "
                          "K = KiB = 1024)", field=name)
    value = int(Fraction(m.group(1)) * UNIT_BYTES[(m.group(2) or "").lower()])
    if value > MAX_BYTE_SIZE_BYTES:
        raise ConfigError(f"byte size {text.strip()!r} is too large (at most "
                          f"{MAX_BYTE_SIZE_BYTES} bytes)", field=name)
    return value


def byte_size_arg(text: str) -> int:
    """:func:`parse_byte_size` as an argparse ``type=``: a bad value is an
    ``ArgumentTypeError``, which argparse reports as ``argument --flag: <message>``."""
    try:
        return parse_byte_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
