"""The ``bdn`` command line.

Commands of this package (mirror, export, manifest, store) are defined here; every other
package contributes its own commands through a ``register(subparsers)`` function in its
``cli`` module. They are found by name at run time, so ``bdn`` stays importable on its
own and the layering of packages (DESIGN.md) holds: ``bdn`` never imports the services
built on top of it.

What every command shares lives here, once, so no command can get it wrong on its own:
``-v``/``-q`` are accepted before or after the command name, ``-q`` turns progress bars
off (:func:`bdn.progress.set_quiet`), and errors end the process in one shape: a line
``bdn: error: ...`` on stderr, or with ``--json`` a JSON object on stderr, never a
traceback for a failure the user can act on (bad input, a store that refuses).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, NoReturn

from bdn.cli_store import store_failure
from bdn.errors import BdnError
from bdn.progress import set_quiet
from bdn.secrets import install_log_scrubber, scrub

# Other packages' command modules; each exposes ``register(subparsers) -> None``.
PLUGIN_MODULES = ("bdn.cli_store", "bdn.cli_mirror_server", "cache.cli", "agent.cli",
                  "serving.cli", "control.cli")

# Loggers of the store SDKs. Their failures come back to us as exceptions that ``main``
# reports in one line; at the default verbosity their own log lines (gcsfs logs every
# exhausted retry with a traceback) would only repeat them.
SDK_LOGGERS = ("gcsfs", "s3fs", "fsspec", "botocore", "aiobotocore", "google")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """The command line did not parse; raised instead of argparse's print-and-exit so
    that ``main`` can answer in the shape the user asked for (text or JSON)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class CliParser(argparse.ArgumentParser):
    """An argument parser whose errors reach ``main`` as :class:`UsageError`.

    ``add_subparsers`` creates subparsers of the parser's own class, so every command
    of every package gets this behaviour without knowing about it.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def version() -> str:
    try:
        return metadata.version("bdn")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _add_common_options(p: argparse.ArgumentParser, top: bool) -> None:
    # Below the top level the defaults are SUPPRESS, so a command that does not repeat
    # -v keeps the count given before its name instead of resetting it to 0.
    default: Any = argparse.SUPPRESS
    if "-v" not in p._option_string_actions:
        p.add_argument("-v", "--verbose", action="count", default=0 if top else default,
                       help="more logging (-v info, -vv debug)")
    if "-q" not in p._option_string_actions:
        p.add_argument("-q", "--quiet", action="store_true",
                       default=False if top else default,
                       help="no progress bars; log errors only")


def _every_parser(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [p]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += _every_parser(child)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="bdn", description="Weight delivery and cold start for GPU inference.")
    parser.add_argument("--version", action="version", version=f"bdn {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in PLUGIN_MODULES:
        importlib.import_module(name).register(sub)
    for i, p in enumerate(_every_parser(parser)):
        _add_common_options(p, top=i == 0)
    return parser


def error_document(e: BaseException) -> dict[str, Any]:
    """``{"error": message, "type": class, ...}`` with the fields the error carries
    (field, url, path, digest, status ...) so a script can act on them."""
    doc: dict[str, Any] = {"error": scrub(str(e)), "type": type(e).__name__}
    for key, value in vars(e).items():
        if key.startswith("_") or key in doc:
            continue
        if isinstance(value, str):
            doc[key] = scrub(value)
        elif value is None or isinstance(value, bool | int | float):
            doc[key] = value
    return doc


def _fail(e: BaseException, as_json: bool, code: int,
          parser: argparse.ArgumentParser | None = None) -> int:
    if as_json:
        print(json.dumps(error_document(e)), file=sys.stderr, flush=True)
    else:
        if parser is not None:
            parser.print_usage(sys.stderr)
        prog = parser.prog if parser is not None else "bdn"
        print(f"{prog}: error: {scrub(str(e))}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _fail(e, "--json" in argv, EXIT_USAGE, e.parser)
    as_json = bool(getattr(args, "json", False))
    level = logging.ERROR if args.quiet else \
        {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for name in SDK_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    set_quiet(args.quiet)
    # Every command and daemon runs through here: one place keeps secrets out of logs.
    install_log_scrubber()
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(handler(args) or 0)
    except BdnError as e:
        return _fail(e, as_json, EXIT_ERROR)
    except KeyboardInterrupt:
        print("bdn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        # A store SDK's own exception (no credentials, endpoint refused) is the user's
        # to fix, not a bug of ours: one line naming the store and the credentials used.
        failure = store_failure(args, e)
        if failure is None:
            raise
        return _fail(failure, as_json, EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
