"""CLI of the agent: ``bdn agent`` (the daemon), ``bdn agent status``, ``bdn pull``.

``bdn pull`` goes through the node's agent when its socket answers (so the pull lands
in the shared node cache and survives the CLI), and otherwise runs the same engine
in-process against a node cache of its own (``--cache-dir``, default ``~/.bdn/node``):
one code path, two hosts. The progress bar shows bytes by tier (node cache, cluster
cache, blob store) as they are verified.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from agent import events
from agent.client import AgentClient, default_socket
from agent.errors import PullError, RequestError
from agent.options import (
    CHUNK_RETRY_WAIT_MAX_S,
    CHUNK_TRIES_PER_SOURCE,
    CONNECT_TIMEOUT_S,
    FIRST_BYTE_TIMEOUT_S,
    MAX_BYTES_IN_FLIGHT,
    MAX_CONNECTIONS,
    PEER_MAX_UPLOADS,
    PEER_PORT,
    READ_TIMEOUT_S,
    STALL_TIMEOUT_S,
    SUSPECT_S,
    AgentOptions,
)
from bdn.cli_store import add_store_args
from bdn.progress import byte_columns, human_bytes, human_rate, progress_enabled
from bdn.store import BlobStore
from bdn.units import byte_size_arg

DEFAULT_CACHE_DIR = str(Path.home() / ".bdn" / "node")
DEFAULT_BUDGET_BYTES = 100 * 1024 ** 3


def _node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None,
                   help=f"node cache directory (default {DEFAULT_CACHE_DIR})")
    p.add_argument("--budget-bytes", type=byte_size_arg, default=None,
                   help="node cache byte budget, e.g. 500G (default 100G)")
    p.add_argument("--peers", default="",
                   help="cluster cache peers: URL[,URL...] (http://host:port)")
    p.add_argument("--peers-dns", default=None, metavar="NAME[:PORT]",
                   help="a DNS name whose addresses are cache peers (headless Service)")
    add_store_args(p, secrets_dir=True)
    p.add_argument("--strict", action="store_true",
                   help="never read the blob store: fail when the cache peers cannot serve")
    p.add_argument("--max-bytes-in-flight", type=byte_size_arg, default=MAX_BYTES_IN_FLIGHT,
                   help="cap on chunk bytes requested but not yet written (default 1G)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help=f"connections (fetch threads) to cache peers (default "
                        f"{MAX_CONNECTIONS})")
    p.add_argument("--chunk-tries-per-source", type=int, default=CHUNK_TRIES_PER_SOURCE,
                   help="corrupt, truncated or failed answers one source may give for a "
                        f"chunk before it is passed over (default {CHUNK_TRIES_PER_SOURCE})")
    p.add_argument("--chunk-retry-wait-max-s", type=float, default=CHUNK_RETRY_WAIT_MAX_S,
                   help="most seconds one chunk may wait between tries, Retry-After "
                        f"included (default {CHUNK_RETRY_WAIT_MAX_S:g})")
    p.add_argument("--connect-timeout-s", type=float, default=CONNECT_TIMEOUT_S,
                   help="seconds to connect to a peer before asking the next "
                        f"(default {CONNECT_TIMEOUT_S:g})")
    p.add_argument("--first-byte-timeout-s", type=float, default=FIRST_BYTE_TIMEOUT_S,
                   help="seconds a peer may take to start answering a chunk before the "
                        "next owner is asked; the least: it grows to what answers take "
                        f"when links are full (default {FIRST_BYTE_TIMEOUT_S:g})")
    p.add_argument("--stall-timeout-s", type=float, default=STALL_TIMEOUT_S,
                   help="least seconds without a byte before a transfer counts as "
                        "stalled; longer when the observed throughput is low "
                        f"(default {STALL_TIMEOUT_S:g})")
    p.add_argument("--read-timeout-s", type=float, default=READ_TIMEOUT_S,
                   help=f"most seconds any read may wait (default {READ_TIMEOUT_S:g})")
    p.add_argument("--peer-listen", default=None, metavar="HOST:PORT",
                   help="serve verified chunks of the node cache to other agents here "
                        f"(node-to-node sharing; port {PEER_PORT} by convention)")
    p.add_argument("--peer-advertise", default=None, metavar="URL",
                   help="the URL other agents reach --peer-listen at (default: from "
                        "--peer-listen when its host is an address, e.g. the pod IP)")
    p.add_argument("--peer-max-uploads", type=int, default=PEER_MAX_UPLOADS,
                   help=f"chunks sent to other agents at once (default {PEER_MAX_UPLOADS})")
    p.add_argument("--peer-upload-rate", type=byte_size_arg, default=0, metavar="BYTES_PER_S",
                   help="average upload rate to other agents, e.g. 500M (default: "
                        "unlimited)")
    p.add_argument("--suspect-s", type=float, default=SUSPECT_S,
                   help="seconds a peer that timed out is passed over before it is "
                        f"probed again, doubling per failed probe (default {SUSPECT_S:g})")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("agent", help="run the node agent (or: bdn agent status)")
    _node_args(p)
    p.add_argument("--socket", default=None,
                   help=f"unix socket of the local API (default ${'{'}BDN_AGENT_SOCKET{'}'} or "
                        f"{default_socket()})")
    p.add_argument("--listen", default=None, help="also listen on loopback HOST:PORT")
    p.add_argument("--socket-group", default=None, metavar="GROUP",
                   help="group (name or gid) that may use the socket; it is created 0660 "
                        "(default: the agent's own group)")
    p.set_defaults(handler=cmd_agent)
    asub = p.add_subparsers(dest="agent_cmd", metavar="SUBCOMMAND")
    st = asub.add_parser("status", help="node cache usage and pulls of the running agent")
    st.add_argument("--socket", dest="status_socket", default=None)
    st.add_argument("--json", action="store_true")
    st.set_defaults(handler=cmd_agent_status)

    p = sub.add_parser("pull", help="pull weights onto this node (through the agent if one "
                                    "runs, else in-process)")
    p.add_argument("target", metavar="CONFIG_OR_REF",
                   help="config.yaml (or its folder) with a weights: section, a ref "
                        "ns/model:tag, or a manifest digest b3:...")
    p.add_argument("--to", default=None,
                   help="mount here: the folder for a ref, the root that mount_locations "
                        "are placed under for a config (omit for a ref: pre-warm only)")
    p.add_argument("--socket", default=None, help="the agent's socket")
    p.add_argument("--standalone", action="store_true",
                   help="do not use a running agent")
    p.add_argument("--json", action="store_true", help="print the final status as JSON")
    p.add_argument("--events", action="store_true", help="print every event as JSON")
    _node_args(p)
    p.set_defaults(handler=cmd_pull)


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    from bdn.store import default_store_url

    peers = tuple(x.strip() for x in (args.peers or "").split(",") if x.strip())
    store = args.store
    if store is None and not args.strict:
        store = default_store_url()
    dns, dns_port = args.peers_dns, 8401
    if dns and ":" in dns:
        dns, _, port = dns.rpartition(":")
        dns_port = int(port)
    try:
        return AgentOptions(
            cache_dir=Path(args.cache_dir or DEFAULT_CACHE_DIR),
            budget_bytes=args.budget_bytes if args.budget_bytes is not None
            else DEFAULT_BUDGET_BYTES,
            peers=peers, peers_dns=dns, peers_dns_port=dns_port, store_url=store,
            strict=args.strict,
            max_bytes_in_flight=args.max_bytes_in_flight,
            max_connections=args.max_connections,
            chunk_tries_per_source=args.chunk_tries_per_source,
            chunk_retry_wait_max_s=args.chunk_retry_wait_max_s,
            connect_timeout_s=args.connect_timeout_s,
            first_byte_timeout_s=args.first_byte_timeout_s,
            stall_timeout_s=args.stall_timeout_s, read_timeout_s=args.read_timeout_s,
            suspect_s=args.suspect_s,
            peer_listen=args.peer_listen, peer_advertise=_peer_advertise(args),
            peer_max_uploads=args.peer_max_uploads,
            peer_upload_rate_bytes_per_s=args.peer_upload_rate)
    except ValueError as e:
        raise RequestError(str(e)) from None


def _peer_advertise(args: argparse.Namespace) -> str | None:
    """``--peer-advertise``, or ``http://HOST:PORT`` of ``--peer-listen`` when HOST is a
    reachable address (not a wildcard, not port 0)."""
    if args.peer_advertise:
        return str(args.peer_advertise)
    if not args.peer_listen:
        return None
    host, _, port = str(args.peer_listen).rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::") or port in ("", "0"):
        raise RequestError(f"--peer-listen {args.peer_listen}: give --peer-advertise URL "
                           "(the address other nodes reach this one at)")
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def store_from_args(args: argparse.Namespace, options: AgentOptions) -> BlobStore | None:
    """The blob store, built by the function ``bdn mirror`` uses (same options)."""
    if options.store_url is None:
        return None
    from bdn.cli_store import open_store

    return open_store(args, url=options.store_url)


def cmd_agent(args: argparse.Namespace) -> int:
    from agent.daemon import run_daemon

    options = options_from_args(args)
    socket_path = args.socket or (None if args.listen else default_socket())
    if socket_path:
        Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
    return run_daemon(options, socket_path, args.listen, socket_group=args.socket_group,
                      store=store_from_args(args, options))


def cmd_agent_status(args: argparse.Namespace) -> int:
    client = AgentClient(args.status_socket or getattr(args, "socket", None))
    st = client.agent_status()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    nc = st["node_cache"]
    print(f"agent at {client.address}")
    print(f"  node cache {st['cache_dir']}: {nc['files']} files, "
          f"{human_bytes(nc['bytes_used'])} of {human_bytes(nc['budget_bytes'])} "
          f"({human_bytes(nc['bytes_pinned'])} pinned, {nc['partial_files']} partial)")
    print(f"  peers: {', '.join(st['peers']) or '-'}; store: {st['store'] or '-'}"
          f"{' (strict: not used)' if st['strict'] else ''}")
    c = st["counters"]
    print(f"  served: node {human_bytes(c['bytes_node'])}, peer "
          f"{human_bytes(c.get('bytes_peer', 0))}, cluster "
          f"{human_bytes(c['bytes_cluster'])}, store {human_bytes(c['bytes_store'])}")
    print(f"  pulls: {', '.join(f'{k} {v}' for k, v in sorted(st['pulls'].items())) or '-'}")
    for p in st["active"]:
        print(f"    {p['id']} {p['state']} {human_bytes(p['bytes_done'])}/"
              f"{human_bytes(p['bytes_total'])} eta {p['eta_s']}s")
    return 0


def build_request(target: str, to: str | None) -> dict[str, Any]:
    """The ``POST /v1/pulls`` body for a CLI target (config path, ref or digest)."""
    from bdn.config import load_model_config

    p = Path(target)
    if p.exists():
        cfg = load_model_config(p)
        if not cfg.weights:
            raise RequestError(f"{target} has no weights: section")
        body: dict[str, Any] = {"weights": [w.to_dict() for w in cfg.weights]}
        if to is not None:
            body["mount_root"] = os.path.abspath(to)
        return body
    body = {"ref": target}
    if to is not None:
        body["mount"] = os.path.abspath(to)
    return body


class _TierBar:
    """A rich progress bar whose description shows bytes by tier."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled and progress_enabled(self.console)
        self.progress: Any = None
        self.task: Any = None
        self.tiers = {"node": 0, "peer": 0, "cluster": 0, "store": 0}

    def __enter__(self) -> _TierBar:
        if self.enabled:
            from rich.progress import Progress, TextColumn

            self.progress = Progress(*byte_columns("[bold]pull"),
                                     TextColumn("{task.description}"), console=self.console,
                                     transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.progress is None:
            return
        kind = ev.get("event")
        if kind == "plan":
            self.task = self.progress.add_task("", total=ev.get("bytes") or None)
            # Complete files and verified parts already on the node send no chunk events.
            self.progress.update(self.task, advance=(ev.get("bytes_cached") or 0)
                                 + (ev.get("bytes_resumed") or 0))
        elif self.task is None:
            return
        elif kind == "chunk":
            tier = ev.get("tier", "node")
            self.tiers[tier] = self.tiers.get(tier, 0) + ev.get("length", 0)
            self.progress.update(self.task, advance=ev.get("length", 0),
                                 description=self._desc())
        elif kind == "done":
            total = self.progress.tasks[0].total
            if total is not None:
                self.progress.update(self.task, completed=total)

    def _desc(self) -> str:
        return " ".join(f"{k} {human_bytes(v)}" for k, v in self.tiers.items() if v)


def cmd_pull(args: argparse.Namespace) -> int:
    body = build_request(args.target, args.to)
    client = AgentClient(args.socket)
    use_agent = not args.standalone and client.healthy()

    def printer(ev: dict[str, Any]) -> None:
        print(json.dumps(ev), flush=True)

    with _TierBar(enabled=not (args.json or args.events)) as bar:
        on_event = printer if args.events else bar
        if use_agent:
            started = client.start_pull(**_client_kwargs(body))
            status = client.wait(started["id"], on_event)
        else:
            options = options_from_args(args)
            status = run_standalone(options, body, on_event,
                                    store=store_from_args(args, options))
    if args.events:
        # --events is NDJSON to the end: the final status is one more event.
        printer(events.Summary(status=status).to_json())
        return 0
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    tiers = status["bytes_by_tier"]
    where = "via the agent" if use_agent else "standalone"
    print(f"pulled {args.target} {where}: {status['files_total']} files, "
          f"{human_bytes(status['bytes_total'])} in {status['elapsed_s']:.2f} s "
          f"({human_rate(status['throughput_bps'])})")
    print(f"  bytes by tier: node {human_bytes(tiers['node'])}, peer "
          f"{human_bytes(tiers.get('peer', 0))}, cluster "
          f"{human_bytes(tiers['cluster'])}, store {human_bytes(tiers['store'])}")
    for m in status["mounts"]:
        print(f"  mounted read-only at {m}")
    return 0


def _client_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    return {"ref": body.get("ref"), "mount": body.get("mount"),
            "weights": body.get("weights"), "mount_root": body.get("mount_root"),
            "prewarm": body.get("prewarm", False)}


def run_standalone(options: AgentOptions, body: dict[str, Any],
                   on_event: Any = None, store: BlobStore | None = None) -> dict[str, Any]:
    """Run one pull with an in-process engine; returns its final status.

    Also the function a demo or a test can call to pull without a daemon.
    """
    from agent.engine import Engine, parse_request

    async def main() -> dict[str, Any]:
        engine = Engine(options, store=store)
        try:
            pull, _ = await engine.submit(parse_request(body))
            async for ev in pull.follow():
                if on_event is not None:
                    on_event(ev.to_json())
            await engine.wait(pull)
            status = pull.status()
            if pull.state != "done":
                raise PullError(f"pull failed: {pull.error}", pull_id=pull.id)
            return status
        finally:
            await engine.close()

    return asyncio.run(main())

