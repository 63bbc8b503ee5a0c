"""``bdn serve-delivered``: a replica pod's entrypoint for a pushed deployment.

A pod sees nothing of the control plane's filesystem: its code and weights come from the
node agent, through the agent's socket and the node's weights folder (both hostPath
volumes, at the same paths inside the pod as on the node, because the agent names
mounts by its own paths). This command is the pod-side twin of what the local-process
backend does for a replica on the control plane's own machine, and reuses the same code
(:class:`control.delivery.AgentDelivery`), so both deliver alike:

1. start the pulls through the agent's socket: the code manifest (awaited: ``bdn
   serve`` needs its ``config.yaml``) and the pinned ``weights:`` entries (the first
   *not* awaited: ``bdn serve`` follows its event stream, so process start, imports and
   ``load()`` overlap the download);
2. run ``bdn serve CODE_DIR --listen ... --pull-events ... --weights-dir ...`` as a child
   (its output is the pod's log; the kubelet's readiness probe talks to it);
3. on SIGTERM (the pod is deleted) pass the signal on, wait for ``bdn serve`` to finish,
   then release its pulls with the release tokens only this process holds, so the agent
   can unpin the mounts once no other replica on the node uses them.

It exits with ``bdn serve``'s status (or 1 when the delivery failed, with the reason on
stderr, which the kubelet reports as the container's termination message).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bdn import settings
from control.errors import RequestError

log = logging.getLogger(__name__)

DEFAULT_SERVE_COMMAND = (sys.executable, "-m", "bdn.cli", "serve")
# bdn serve gets this long to finish its requests after SIGTERM; the kubelet's own
# grace period (terminationGracePeriodSeconds) bounds the whole pod anyway.
SERVE_STOP_GRACE_S = 25.0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve-delivered",
        help="a replica pod's entrypoint: the node agent delivers a pushed deployment's "
             "code and weights, then bdn serve runs it",
        description="Start the pulls of a pushed deployment through the node agent's "
                    "socket (code awaited, weights followed as they arrive), run `bdn "
                    "serve` on them, and release the pulls when stopped (SIGTERM).")
    p.add_argument("--agent-socket", required=True, metavar="PATH",
                   help="the node agent's unix socket (a hostPath in the pod)")
    p.add_argument("--mounts-root", required=True, metavar="DIR",
                   help="the node's weights folder, where the agent places the mounts "
                        "(the same path inside the pod as on the node)")
    p.add_argument("--deployment", required=True, help="the bdn deployment id")
    p.add_argument("--code", required=True, metavar="DIGEST",
                   help="the code manifest (b3:...) pinned at push")
    p.add_argument("--weights", default="[]", metavar="JSON",
                   help="the pinned weights: entries as a JSON list (each with its ref)")
    p.add_argument("--listen", required=True, help="HOST:PORT for bdn serve")
    p.add_argument("--serve-command", default=None,
                   help="command that serves a model folder (default: this Python's "
                        "`bdn serve`); MODEL_DIR --listen ... are appended")
    p.set_defaults(handler=cmd_serve_delivered)


def parse_weights(raw: str) -> tuple[Mapping[str, Any], ...]:
    """``--weights``: a JSON list of objects, each with its pinned ``ref``."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"is not valid JSON at offset {e.pos}: {e.msg}",
                           field="--weights") from None
    if not isinstance(doc, list):
        raise RequestError("must be a JSON list of weights: entries", field="--weights")
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict) or not isinstance(entry.get("ref"), str) or \
                not isinstance(entry.get("mount_location"), str):
            raise RequestError("must be an object with a pinned ref and a mount_location",
                               field=f"--weights[{i}]")
    return tuple(doc)


def cmd_serve_delivered(args: argparse.Namespace) -> int:
    weights = parse_weights(args.weights)
    if not os.path.isabs(args.mounts_root):
        raise RequestError("must be an absolute path", field="--mounts-root")
    command = (tuple(shlex.split(args.serve_command)) if args.serve_command
               else DEFAULT_SERVE_COMMAND)
    return asyncio.run(serve_delivered(
        agent_socket=args.agent_socket, mounts_root=Path(args.mounts_root),
        deployment_id=args.deployment, code=args.code, weights=weights,
        listen=args.listen, command=command))


async def serve_delivered(*, agent_socket: str, mounts_root: Path, deployment_id: str,
                          code: str, weights: Sequence[Mapping[str, Any]], listen: str,
                          command: Sequence[str]) -> int:
    from control.backends import ReplicaSpec
    from control.delivery import AgentDelivery

    replica_id = settings.REPLICA_ID.get() or socket.gethostname()
    spec = ReplicaSpec(model_id=settings.MODEL_ID.get(),
                       deployment_id=deployment_id, deployment_name="", model_dir="",
                       code=code, weights=tuple(weights))
    delivery = AgentDelivery(f"unix:{agent_socket}", mounts_root)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # A stop during the delivery cancels it; AgentDelivery.prepare then releases
    # whatever pulls it had started.
    preparing = asyncio.ensure_future(delivery.prepare(spec, replica_id))
    stopped = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({preparing, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not preparing.done():
        preparing.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await preparing
        print(f"replica {replica_id}: stopped before its delivery finished", flush=True)
        return 0
    stopped.cancel()
    prepared = preparing.result()  # a BackendError says what the agent refused
    argv = [*command, prepared.model_dir, "--listen", listen, *prepared.args]
    print(f"replica {replica_id}: code in {prepared.model_dir}; running "
          f"{' '.join(argv)}", flush=True)
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
        waiting = asyncio.ensure_future(proc.wait())
        stopped = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            # Pass the stop on (a real container's PID 1 alone gets the signal).
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(waiting), SERVE_STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await waiting
        stopped.cancel()
        status = waiting.result()
    finally:
        await delivery.release(prepared)
        print(f"replica {replica_id}: released pulls {', '.join(prepared.pulls)}",
              flush=True)
    return 0 if stopping.is_set() else (status if status >= 0 else 128 - status)
