"""``bdn cache-server``: run one cluster cache pod (see :mod:`cache.server`)."""

from __future__ import annotations

import argparse

from bdn.cli_store import add_store_args
from bdn.errors import ConfigError
from bdn.service import ListenAddress
from bdn.store import default_store_url
from bdn.units import byte_size_arg
from cache.edge import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    VERIFY_INTERVAL_S,
)
from cache.options import (
    DEFAULT_FILL_THREADS,
    DEFAULT_PREFETCH_CONCURRENCY,
    DEFAULT_PREFETCH_RATE_BYTES_PER_S,
    DEFAULT_SEND_THREADS,
    REF_TTL_S,
    SEND_THREADS_AUTO,
    CacheServerOptions,
    default_workers,
)
from cache.workers import serve

DEFAULT_LISTEN = "127.0.0.1:8401"
# ``1073741824``, ``512M``, ``10GiB``, ``1.5T`` → bytes: the one parser (bdn.units),
# under the name tests and bench scripts import it by.
parse_bytes = byte_size_arg


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("cache-server", help="run a cluster cache server (read-through, "
                       "single-flight fills, byte ranges, disk LRU)")
    add_store_args(p, secrets_dir=True)
    p.add_argument("--dir", required=True, help="cache folder (objects + LMDB index)")
    p.add_argument("--budget-bytes", required=True, type=parse_bytes,
                   help="most object bytes kept on disk, e.g. 500G")
    p.add_argument("--listen", default=DEFAULT_LISTEN,
                   help=f"HOST:PORT or unix:PATH (default {DEFAULT_LISTEN}; port 0: any)")
    p.add_argument("--prefetch-rate", type=parse_bytes,
                   default=DEFAULT_PREFETCH_RATE_BYTES_PER_S, metavar="BYTES_PER_S",
                   help="byte rate limit of background prefetch fills (default 100M)")
    p.add_argument("--prefetch-concurrency", type=int, default=DEFAULT_PREFETCH_CONCURRENCY,
                   help="background fills at once (default %(default)s)")
    p.add_argument("--fill-threads", type=int, default=DEFAULT_FILL_THREADS,
                   help="most concurrent blob store reads (default %(default)s)")
    p.add_argument("--send-threads", type=int, default=SEND_THREADS_AUTO,
                   help="responses sent with sendfile at once off the event loop, per "
                   "process (0: send on the event loop; default: 0 with several workers, "
                   f"{DEFAULT_SEND_THREADS} with one)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes serving the port: the owner (fills, index, eviction) "
                   "and N-1 workers that send cached objects and forward the rest to it "
                   f"(default 1; this machine's usable CPUs: {default_workers()})")
    p.add_argument("--ref-ttl", type=float, default=REF_TTL_S, metavar="SECONDS",
                   help="how long a resolved ref is reused (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                   metavar="SECONDS", help="close a connection that sends no request for "
                   "this long (default %(default)s)")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                   metavar="SECONDS", help="close a connection whose request head is not "
                   "complete this long after its first byte (default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   metavar="SECONDS", help="answer 408 when a request body has not "
                   "arrived within this (default %(default)s)")
    p.add_argument("--verify-interval", type=float, default=VERIFY_INTERVAL_S,
                   metavar="SECONDS", help="least time between two re-hashes of one "
                   "object by POST .../verify; sooner gets 429 (0: no limit; default "
                   "%(default)s)")
    p.add_argument("--fsync", action="store_true",
                   help="sync every completed object to disk (survives power loss)")
    p.set_defaults(handler=cmd_cache_server)


def cmd_cache_server(args: argparse.Namespace) -> int:
    try:
        options = CacheServerOptions(
            store_url=args.store or default_store_url(), cache_dir=args.dir,
            budget_bytes=args.budget_bytes, prefetch_rate_bytes_per_s=args.prefetch_rate,
            prefetch_concurrency=args.prefetch_concurrency, fill_threads=args.fill_threads,
            send_threads=args.send_threads,
            ref_ttl_s=args.ref_ttl, fsync=args.fsync,
            idle_timeout_s=args.idle_timeout, header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout, verify_interval_s=args.verify_interval,
            **({} if args.workers is None else {"workers": args.workers}))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    store = None
    if args.store_endpoint_url or args.store_secret:
        # Built by the function `bdn mirror` uses, so the same flags mean the same.
        from bdn.cli_store import open_store

        store = open_store(args, url=options.store_url)
    return serve(options, ListenAddress.parse(args.listen), store)
