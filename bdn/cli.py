"""The ``bdn`` command line.

Commands of this package (mirror, export, manifest, store) are defined here; every other
package contributes its own commands through a ``register(subparsers)`` function in its
``cli`` module. They are found by name at run time, so ``bdn`` stays importable on its
own and the layering of packages (DESIGN.md) holds: ``bdn`` never imports the services
built on top of it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from bdn.errors import BdnError
from bdn.secrets import install_log_scrubber, scrub

# Other packages' command modules; each exposes ``register(subparsers) -> None``.
PLUGIN_MODULES = ("bdn.cli_store", "bdn.cli_mirror_server", "cache.cli", "agent.cli",
                  "serving.cli", "control.cli")

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bdn", description="Weight delivery and cold start for GPU inference.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # A package not written yet is skipped; a broken import inside one is not.
            if e.name is not None and name.startswith(e.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every command and daemon runs through here: one place keeps secrets out of logs.
    install_log_scrubber()
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except BdnError as e:
        print(f"bdn: error: {scrub(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bdn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
