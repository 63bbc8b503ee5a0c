"""``bdn`` commands of the control plane.

``bdn control-server`` runs the management API and the router in one daemon; the other
commands (``push``, ``deployments``, ``autoscaling``, ``promote``, ``predict``,
``environments``) are thin clients of its API (``bdn deployments MODEL --rename DEP
NAME`` renames one). ``bdn environments update MODEL ENV
--rolling ...`` sets an environment's promotion settings; ``bdn promote ... --watch``
prints a promotion's steps and traffic split as they happen, and ``bdn promote MODEL
--pause`` (``--resume``, ``--cancel``, ``--force-cancel``, ``--force-roll-forward``)
controls the promotion in progress. Clients take ``--server URL`` (env
``BDN_CONTROL_URL``) and ``--api-key`` (env ``BDN_API_KEY``); the key is never printed.
Tables and progress go through rich, on stderr where they are decoration; JSON results
go to stdout so they pipe.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bdn import settings
from bdn.config import read_config_document
from control.client import API_KEY_ENV, SERVER_URL_ENV, ControlClient, q
from control.errors import ClientError, RequestError
from control.promotion_settings import CLEANUP_STRATEGIES, CONFIG_RANGES, describe_config_range
from control.rollout import ACTIONS_BY_PATH
from control.settings import RANGES, describe_range

DEFAULT_LISTEN = "127.0.0.1:8700"
# XDG's place for state that should persist across restarts, outside any checkout.
DEFAULT_STATE_DIR = str(Path(os.environ.get("XDG_STATE_HOME")
                             or Path.home() / ".local" / "state") / "bdn" / "control")
STATE_DIR_ENV = settings.CONTROL_STATE.name
REPLICA_COMMAND_ENV = settings.REPLICA_COMMAND.name
PROMOTION_POLL_INTERVAL_S = 0.25
WATCH_POLL_INTERVAL_S = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("control-server", help="run the management API and router",
                              description="Run the control plane: management API under /v1/, "
                              "inference router under /models/, Prometheus text at /metrics.")
    p.add_argument("--listen", default=DEFAULT_LISTEN,
                   help=f"HOST:PORT or unix:PATH (default {DEFAULT_LISTEN}; port 0 = any)")
    p.add_argument("--state-dir", type=Path,
                   default=Path(settings.CONTROL_STATE.get() or DEFAULT_STATE_DIR),
                   help=f"where the SQLite state lives (env {STATE_DIR_ENV}; "
                   f"default {DEFAULT_STATE_DIR})")
    p.add_argument("--api-key-file", type=Path,
                   help=f"file with accepted API keys, one a line (else {API_KEY_ENV}, else "
                   "a key generated once into STATE_DIR/api-key)")
    p.add_argument("--store", default=None,
                   help="blob store for pushed models and their weights: a folder or "
                   "s3://, gs:// URL (env BDN_STORE; default ~/.bdn/store)")
    p.add_argument("--agent", default=None, metavar="ADDRESS",
                   help="node agent that delivers replicas' code and weights (unix:PATH or "
                   "http://HOST:PORT); default: run one as a child, node cache under "
                   "STATE_DIR/agent")
    p.add_argument("--cache-peers", default="",
                   help="comma-separated cluster cache pods the embedded agent reads "
                   "through (default: none, the store directly)")
    p.add_argument("--secrets-dir", default=None,
                   help="folder of secrets (one file per name) that pushed configs may "
                   "declare (else BDN_SECRET_<NAME> of this server's environment)")
    p.add_argument("--replica-command",
                   default=settings.REPLICA_COMMAND.get(),
                   help="command that runs one replica; MODEL_DIR --listen HOST:0 is appended "
                   f"(env {REPLICA_COMMAND_ENV}; default: this Python's `bdn serve`)")
    p.add_argument("--tick-interval-s", type=float, default=1.0,
                   help="seconds between autoscaler evaluations (default 1)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="run autoscaling time this many times faster than wall time "
                   "(tests and demos only; default 1)")
    p.add_argument("--queue-timeout-s", type=float, default=600.0,
                   help="how long a request may wait for its body to arrive and for a "
                        "ready replica (default 600)")
    p.add_argument("--max-queue", type=int, default=1000,
                   help="requests that may wait per deployment, for their body to arrive "
                        "or for a ready replica; the next gets 429 with Retry-After "
                        "(default 1000)")
    p.add_argument("--ready-timeout-s", type=float, default=600.0,
                   help="how long a replica may take to become ready (default 600)")
    p.add_argument("--drain-timeout-s", type=float, default=60.0,
                   help="how long a stopping replica may finish its requests (default 60)")
    p.add_argument("--start-retry-backoff-s", type=float, default=1.0,
                   help="first wait before starting a replica again after a failed start; "
                   "doubles per failure up to 30 s (default 1)")
    _kube_args(p)
    p.set_defaults(handler=cmd_control_server)

    p = subparsers.add_parser("push", help="push a model folder as a new deployment")
    _client_args(p)
    p.add_argument("model_dir", type=Path, help="folder with config.yaml and model/model.py "
                   "(sent to the server; its weights: are mirrored and pinned)")
    p.add_argument("--watch", action="store_true",
                   help="push to the development deployment and re-push on every change")
    p.add_argument("--promote", action="store_true", help="promote to production once ready")
    p.add_argument("--environment", help="promote to this environment once ready")
    p.add_argument("--name", help="deployment name (default deployment-N)")
    p.add_argument("--model-name", help="model name (default: config.yaml model_name)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a promotion")
    p.set_defaults(handler=cmd_push)

    p = subparsers.add_parser("deployments", help="list, activate, deactivate or delete "
                              "deployments")
    _client_args(p)
    p.add_argument("model", nargs="?", help="model name or id (default: every model)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--activate", metavar="DEPLOYMENT")
    group.add_argument("--deactivate", metavar="DEPLOYMENT")
    group.add_argument("--delete", metavar="DEPLOYMENT")
    group.add_argument("--rename", nargs=2, metavar=("DEPLOYMENT", "NAME"),
                       help="give a published deployment another name (ids do not change)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_deployments)

    p = subparsers.add_parser("autoscaling", help="show or set autoscaling settings")
    sub = p.add_subparsers(dest="autoscaling_command", metavar="ACTION", required=True)
    s = sub.add_parser("set", help="PATCH a deployment's (or environment's) settings")
    _client_args(s)
    s.add_argument("model", help="model name or id")
    target = s.add_mutually_exclusive_group()
    target.add_argument("--deployment", default="production",
                        help="deployment id, 'production' (default) or 'development'")
    target.add_argument("--environment", help="set an environment's settings instead")
    for name in RANGES:
        s.add_argument("--" + name.replace("_", "-"), dest=name, type=int,
                       help=describe_range(name).replace("%", "%%"))
    s.set_defaults(handler=cmd_autoscaling_set)
    s = sub.add_parser("show", help="print a deployment's settings")
    _client_args(s)
    s.add_argument("model")
    s.add_argument("--deployment", default="production")
    s.set_defaults(handler=cmd_autoscaling_show)

    p = subparsers.add_parser("promote", help="promote a deployment to an environment")
    _client_args(p)
    p.add_argument("model", help="model name or id")
    p.add_argument("deployment", nargs="?",
                   help="deployment id or name ('development' publishes the dev deployment)")
    p.add_argument("--environment", default="production")
    p.add_argument("--rollback", action="store_true",
                   help="promote the environment's previous deployment again")
    p.add_argument("--keep-previous", action="store_true",
                   help="do not scale the previous deployment down")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--watch", action="store_true",
                   help="print each change of the promotion (status, step, traffic split, "
                   "replicas) until it ends")
    actions = p.add_mutually_exclusive_group()
    for path in ACTIONS_BY_PATH:
        action = path.removesuffix("_promotion")
        actions.add_argument("--" + action.replace("_", "-"), dest="action",
                             action="store_const", const=path,
                             help=f"{action.replace('_', ' ')} the environment's promotion in "
                             "progress (no deployment argument)")
    p.set_defaults(handler=cmd_promote, action=None)

    p = subparsers.add_parser("predict", help="call a model through the router")
    _client_args(p)
    p.add_argument("model", help="model name or id")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--environment", default="production")
    target.add_argument("--deployment")
    target.add_argument("--development", action="store_true")
    p.add_argument("-d", "--data", default=None,
                   help="JSON body, @FILE, or - for stdin (default {})")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.set_defaults(handler=cmd_predict)

    from control.chains_cli import register as register_chains
    register_chains(subparsers)

    p = subparsers.add_parser(
        "environments", help="list, create, delete or update environments",
        usage="bdn environments MODEL [--create NAME | --delete NAME] [--json]\n"
              "       bdn environments update MODEL ENV [--rolling | --no-rolling] "
              "[--max-surge-percent N | --max-unavailable-percent N] ...")
    _client_args(p)
    p.add_argument("model", help="model name or id; or 'update' followed by MODEL ENV")
    p.add_argument("update_args", nargs="*", metavar="MODEL ENV", help=argparse.SUPPRESS)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--create", metavar="NAME")
    group.add_argument("--delete", metavar="NAME")
    p.add_argument("--json", action="store_true")
    rolling = p.add_argument_group("update: promotion settings (rolling deployments)")
    rolling.add_argument("--rolling", action=argparse.BooleanOptionalAction, default=None,
                         help="promote step by step (rolling_deploy)")
    for key in CONFIG_RANGES:
        rolling.add_argument("--" + key.replace("_", "-"), dest=key, type=int,
                             help=describe_config_range(key).replace("%", "%%"))
    rolling.add_argument("--cleanup", choices=CLEANUP_STRATEGIES,
                         help="what happens to the previous deployment after success "
                         "(promotion_cleanup_strategy)")
    p.set_defaults(handler=cmd_environments)

    from control import pod
    pod.register(subparsers)  # `bdn serve-delivered`, a replica pod's entrypoint


def _kube_args(p: argparse.ArgumentParser) -> None:
    """``--backend kubernetes`` and its settings (control.kube.KubeBackendOptions)."""
    from control.kube import DEFAULT_AGENT_SOCKET_DIR, DEFAULT_NODE_WEIGHTS_DIR

    p.add_argument("--backend", choices=("local", "kubernetes"), default="local",
                   help="what runs replicas: local processes (default) or one Kubernetes "
                   "Deployment per deployment")
    p.add_argument("--kubeconfig", default=None, metavar="FILE",
                   help="kubernetes: the API server's kubeconfig (default: the in-cluster "
                   "config of this pod's ServiceAccount)")
    p.add_argument("--namespace", default=None,
                   help="kubernetes: where replicas' Deployments live (default bdn)")
    p.add_argument("--replica-image", default=None, metavar="IMAGE",
                   help="kubernetes: the replicas' image (default: this pod's own image, "
                   "found through POD_NAME)")
    p.add_argument("--agent-socket-dir", default=DEFAULT_AGENT_SOCKET_DIR, metavar="DIR",
                   help="kubernetes: the node folder holding the agent's socket, mounted "
                   f"into replicas (default {DEFAULT_AGENT_SOCKET_DIR})")
    p.add_argument("--node-weights-dir", default=DEFAULT_NODE_WEIGHTS_DIR, metavar="DIR",
                   help="kubernetes: the node folder where the agent places code and "
                   f"weights, mounted read-only into replicas (default "
                   f"{DEFAULT_NODE_WEIGHTS_DIR})")


def _kube_backend(args: argparse.Namespace, command: tuple[str, ...] | None) -> Any:
    """The Kubernetes backend the flags ask for, or None for local processes."""
    if args.backend != "kubernetes":
        return None
    from control.kube import KubeBackendOptions, KubernetesBackend

    return KubernetesBackend(KubeBackendOptions(
        namespace=args.namespace or "bdn", kubeconfig=args.kubeconfig,
        image=args.replica_image or "", own_pod=os.environ.get("POD_NAME", ""),
        command=command or (), agent_socket_dir=args.agent_socket_dir,
        node_weights_dir=args.node_weights_dir))


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None,
                   help=f"control server URL (env {SERVER_URL_ENV}; default http://{DEFAULT_LISTEN})")
    p.add_argument("--api-key", default=None, help=f"API key (env {API_KEY_ENV})")


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(args.server, args.api_key)


def _console(stderr: bool = True) -> Any:
    from rich.console import Console

    from bdn.progress import quiet
    # stderr carries decoration only (spinners, milestones): `bdn -q` silences it.
    return Console(stderr=stderr, quiet=stderr and quiet())


# -- control-server ----------------------------------------------------------------------

def cmd_control_server(args: argparse.Namespace) -> int:
    from bdn.service import ListenAddress, serve_forever
    from bdn.store import default_store_url
    from control.api import ServerOptions, build_app, load_or_create_api_keys
    from control.backends import LocalBackendOptions
    from control.controller import ControllerOptions

    listen = ListenAddress.parse(args.listen)
    state_dir: Path = args.state_dir.resolve()
    keys, source = load_or_create_api_keys(state_dir, args.api_key_file,
                                           settings.API_KEY.get())
    given = tuple(shlex.split(args.replica_command)) if args.replica_command else None
    command = given or LocalBackendOptions().command
    backend = LocalBackendOptions(command=command, ready_timeout_s=args.ready_timeout_s,
                                  start_retry_backoff_s=args.start_retry_backoff_s)
    kube = _kube_backend(args, given)
    peers = tuple(x.strip() for x in args.cache_peers.split(",") if x.strip())
    options = ServerOptions(
        state_dir=state_dir, api_keys=keys, backend=backend, store_url=args.store,
        agent=args.agent, cache_peers=peers, secrets_dir=args.secrets_dir,
        controller=ControllerOptions(
            tick_interval_s=args.tick_interval_s, time_scale=args.time_scale,
            queue_timeout_s=args.queue_timeout_s, max_queue=args.max_queue,
            drain_timeout_s=args.drain_timeout_s))
    agents = (args.agent or "embedded (node cache in STATE_DIR/agent)" if kube is None
              else f"on every node (replicas: Kubernetes namespace {kube.options.namespace})")
    print(f"bdn control-server: state in {state_dir}, API keys from {source}, store "
          f"{args.store or default_store_url()}, node agent {agents}",
          file=sys.stderr, flush=True)
    return serve_forever(lambda: build_app(options, kube), listen)


# -- push --------------------------------------------------------------------------------

def _model_name(model_dir: Path, override: str | None) -> str:
    if override:
        return override
    config_path = model_dir / "config.yaml"
    if not config_path.is_file():
        raise RequestError(f"{model_dir} has no config.yaml", field="model_dir")
    config = read_config_document(config_path) or {}
    name = config.get("model_name") if isinstance(config, dict) else None
    return str(name) if name else model_dir.resolve().name


def _push_once(client: ControlClient, model_dir: Path, model_name: str, *,
               name: str | None, development: bool,
               show: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Upload what the server lacks of the folder, then create the deployment (the
    server mirrors code and weights; its progress goes to ``show``)."""
    from control.push import list_folder

    files = list_folder(model_dir)
    digests = sorted({f.digest for f in files})
    missing = set(client.request("POST", "/v1/uploads/missing",
                                 {"digests": digests})["missing"])
    for f in files:
        if f.digest in missing:
            client.upload(f"/v1/uploads/{q(f.digest)}", model_dir / f.path)
            missing.discard(f.digest)
    model = client.find_model(model_name)
    if model is None:
        model = client.request("POST", "/v1/models", {"name": model_name})
    body: dict[str, Any] = {"files": [{"path": f.path, "digest": f.digest,
                                       "executable": f.executable} for f in files],
                            "development": development}
    if name:
        body["name"] = name
    dep = None
    for event in client.stream("POST", f"/v1/models/{q(model['id'])}/deployments", body):
        if event.get("event") == "deployment":
            dep = event
        elif event.get("event") == "error":
            raise ClientError(f"push failed: {event.get('error')}",
                              status=int(event.get("status") or 0))
        elif show is not None:
            show(event)
    if dep is None:
        raise ClientError("the control server ended the push without an answer", status=0)
    return model, dep


def _show_push_event(console: Any, bar: Any = None) -> Any:
    """Prints a push's milestones; feeds the mirror's byte events to ``bar``."""
    from bdn.progress import human_bytes

    def show(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if bar is not None and kind in ("mirror_listed", "mirror_bytes"):
            bar({**event, "event": kind.removeprefix("mirror_")})
        if kind == "code_manifest":
            console.print(f"code: {event['digest']}")
        elif kind == "weights":
            console.print(f"weights[{event['index']}]: mirroring {event['source']}")
        elif kind == "mirror_listed":
            console.print(f"  {event.get('files')} files, {human_bytes(event.get('bytes', 0))}")
        elif kind == "weights_manifest":
            rev = (event.get("source") or {}).get("revision")
            console.print(
                f"  pinned {event['digest']}{f' (revision {rev})' if rev else ''}; "
                f"{event.get('files_reused', 0)}/{event.get('files', 0)} files already "
                f"mirrored, {human_bytes(event.get('bytes_from_origin', 0))} from the source")
    return show


def cmd_push(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.watch and (args.promote or args.environment or args.name):
        raise RequestError("--watch pushes the development deployment; publish with a plain "
                           "`bdn push` to promote or name a deployment", field="--watch")
    model_dir: Path = args.model_dir
    model_name = _model_name(model_dir, args.model_name)
    from bdn.progress import byte_progress

    console = _console()
    with byte_progress("mirror") as bar:
        model, dep = _push_once(client, model_dir, model_name, name=args.name,
                                development=args.watch, show=_show_push_event(console, bar))
    console.print(f"pushed [bold]{model_name}[/] ({model['id']}): deployment "
                  f"[bold]{dep['name']}[/] ({dep['id']}), status {dep['status']}")
    env = args.environment or ("production" if args.promote else None)
    if env:
        client.request("POST", f"/v1/models/{q(model['id'])}/environments/{q(env)}/promote",
                       {"deployment_id": dep["id"]})
        if not args.no_wait:
            _wait_promotion(client, model["id"], env, dep["id"])
    print(json.dumps({"model_id": model["id"], "deployment_id": dep["id"],
                      "name": dep["name"],
                      "predict_url": client.base_url + client.predict_path(
                          model["id"], environment=env, deployment=None if env else dep["id"],
                          development=args.watch)}))
    if args.watch:
        return _watch(client, model_dir, model_name)
    return 0


def _snapshot(model_dir: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in model_dir.rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts:
            st = p.stat()
            out[str(p)] = (st.st_mtime_ns, st.st_size)
    return out


def _watch(client: ControlClient, model_dir: Path, model_name: str) -> int:
    console = _console()
    console.print(f"watching {model_dir} for changes (Ctrl-C to stop)")
    before = _snapshot(model_dir)
    while True:
        time.sleep(WATCH_POLL_INTERVAL_S)  # a CLI watching files: polling is the portable way
        now = _snapshot(model_dir)
        if now != before:
            before = now
            _, dep = _push_once(client, model_dir, model_name, name=None, development=True)
            console.print(f"change detected: development deployment {dep['id']} reloaded")


def describe_promotion(promo: dict[str, Any]) -> str:
    """One line of a promotion's progress: ``RAMPING_UP step 2/4: 50% of traffic to the
    candidate; replicas previous 2, candidate 2 (step 2/4 done; stabilizing ...)``."""
    state = promo.get("status", "?")
    percent = promo.get("percent_traffic_to_new_version", 0)
    if not promo.get("rolling"):
        return (f"{state}: {promo.get('ready_replicas', 0)}/{promo.get('needed_replicas', 1)} "
                f"replicas of {promo.get('deployment_id')} ready, {percent:g}% of traffic to it")
    return (f"{state} step {promo.get('step')}/{promo.get('steps')}: {percent:g}% of traffic "
            f"to {promo.get('deployment_id')}; replicas previous "
            f"{promo.get('previous_replicas')}, candidate {promo.get('candidate_replicas')}"
            + (" (pause requested)" if promo.get("pause_requested") else "")
            + (f" - {promo['reason']}" if promo.get("reason") else ""))


def _wait_promotion(client: ControlClient, model_id: str, env: str, dep_id: str | None, *,
                    watch: bool = False, canceling: bool = False) -> dict[str, Any]:
    """Poll the environment until its promotion ends; with ``watch``, print every change
    (steps, traffic split, replicas). Ends with an error unless it SUCCEEDED (or, when
    ``canceling``, was CANCELED)."""
    console = _console()
    last = None
    promo: dict[str, Any] = {}
    with console.status(f"promoting {dep_id or ''} to {env}...") as status:
        while True:
            promo = client.environment(model_id, env).get("in_progress_promotion") or {}
            state = promo.get("status")
            line = describe_promotion(promo) if promo else "no promotion"
            if watch and line != last:
                console.print(line, markup=False, highlight=False)
                last = line
            if state == "SUCCEEDED" or (canceling and state == "CANCELED"):
                break
            if state in ("FAILED", "CANCELED") or not promo:
                raise ClientError(f"promotion to {env} ended {state or 'unknown'}: "
                                  f"{promo.get('error') or promo.get('reason') or ''}",
                                  status=0)
            status.update(f"promoting to {env}: {line}")
            time.sleep(PROMOTION_POLL_INTERVAL_S)
    if state == "SUCCEEDED":
        console.print(f"deployment {promo.get('deployment_id', dep_id)} now serves "
                      f"[bold]{env}[/]")
    else:
        console.print(f"promotion of {promo.get('deployment_id')} to [bold]{env}[/] canceled")
    return promo


# -- deployments -------------------------------------------------------------------------

def cmd_deployments(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.rename:
        if not args.model:
            raise RequestError("name the model whose deployment to rename", field="model")
        model = client.model(args.model)
        dep, name = args.rename
        dep = next((d["id"] for d in client.deployments(model["id"]) if d["name"] == dep), dep)
        renamed = client.request("PATCH", f"/v1/models/{q(model['id'])}/deployments/{q(dep)}",
                                 {"name": name})
        _console().print(f"deployment {renamed['id']} renamed to [bold]{renamed['name']}[/]")
        return 0
    action = next(((verb, getattr(args, verb)) for verb in ("activate", "deactivate", "delete")
                   if getattr(args, verb)), None)
    if action is not None:
        if not args.model:
            raise RequestError("name the model whose deployment to change", field="model")
        model = client.model(args.model)
        verb, dep = action
        path = f"/v1/models/{q(model['id'])}/deployments/{q(dep)}"
        if verb == "delete":
            client.request("DELETE", path)
        else:
            client.request("POST", f"{path}/{verb}")
        _console().print(f"deployment {dep}: {verb}d")
        return 0
    models = [client.model(args.model)] if args.model else client.models()
    rows = [(m, d) for m in models for d in client.deployments(m["id"])]
    if args.json:
        print(json.dumps([d for _, d in rows], indent=2))
        return 0
    from rich.table import Table
    table = Table("model", "deployment", "id", "environment", "status", "replicas",
                  "in flight", "min-max", "cold starts (s)", "last cold start")
    for m, d in rows:
        s = d["autoscaling_settings"]
        table.add_row(m["name"], d["name"], d["id"], d["environment"] or "", d["status"],
                      f"{d['active_replica_count']}/{d['desired_replica_count']}",
                      str(d["in_flight_requests"]), f"{s['min_replica']}-{s['max_replica']}",
                      ", ".join(f"{x:.2f}" for x in d["cold_start_seconds"][-3:]),
                      describe_cold_start(d.get("last_cold_start")))
    _console(stderr=False).print(table)
    return 0


def describe_cold_start(record: dict[str, Any] | None) -> str:
    """``weights 1.20s, load 0.30s, model_init 0.05s; node 1.20 GiB, store 0 B``."""
    if not record:
        return ""
    from bdn.progress import human_bytes

    phases = record.get("phases") or {}
    parts = [f"{name} {phases[name]:.2f}s"
             for name in ("slot", "weights", "load", "model_init", "total") if name in phases]
    tiers = record.get("bytes_by_tier") or {}
    moved = [f"{tier} {human_bytes(n)}" for tier, n in tiers.items() if n]
    return ", ".join(parts) + ("; " + ", ".join(moved) if moved else "")


# -- autoscaling -------------------------------------------------------------------------

def cmd_autoscaling_set(args: argparse.Namespace) -> int:
    client = _client(args)
    model = client.model(args.model)
    patch = {k: getattr(args, k) for k in RANGES if getattr(args, k) is not None}
    if not patch:
        raise RequestError("give at least one setting to change, e.g. --min-replica 1",
                           field="settings")
    if args.environment:
        result = client.request(
            "PATCH", f"/v1/models/{q(model['id'])}/environments/{q(args.environment)}",
            {"autoscaling_settings": patch})
    else:
        result = client.request(
            "PATCH",
            f"/v1/models/{q(model['id'])}/deployments/{q(args.deployment)}/autoscaling_settings",
            patch)
    print(json.dumps(result))
    return 0


def cmd_autoscaling_show(args: argparse.Namespace) -> int:
    client = _client(args)
    model = client.model(args.model)
    dep = client.request("GET", f"/v1/models/{q(model['id'])}/deployments/{q(args.deployment)}")
    print(json.dumps(dep["autoscaling_settings"], indent=2))
    return 0


# -- promote -----------------------------------------------------------------------------

def cmd_promote(args: argparse.Namespace) -> int:
    client = _client(args)
    model = client.model(args.model)
    if args.action is not None:
        if args.deployment or args.rollback:
            raise RequestError("an action applies to the promotion in progress; give no "
                               "deployment", field="--" + args.action.removesuffix(
                                   "_promotion").replace("_", "-"))
        answer = client.request(
            "POST", f"/v1/models/{q(model['id'])}/environments/{q(args.environment)}/"
            f"{args.action}")
        print(json.dumps(answer))
        if args.watch:
            _wait_promotion(client, model["id"], args.environment, None, watch=True,
                            canceling=args.action in ("cancel_promotion",
                                                      "force_cancel_promotion"))
        return 0
    env = client.environment(model["id"], args.environment)
    if args.rollback:
        if args.deployment:
            raise RequestError("give either a deployment or --rollback", field="--rollback")
        target = env.get("previous_deployment_id")
        if not target:
            raise ClientError(f"environment {args.environment} has no previous deployment to "
                              "roll back to", status=0)
    elif args.deployment:
        target = args.deployment
        for d in client.deployments(model["id"]):
            if d["name"] == args.deployment:
                target = d["id"]
    else:
        raise RequestError("name the deployment to promote (or --rollback)", field="deployment")
    dep = client.request(
        "POST", f"/v1/models/{q(model['id'])}/environments/{q(args.environment)}/promote",
        {"deployment_id": target, "scale_down_previous_deployment": not args.keep_previous})
    if args.watch or not args.no_wait:
        _wait_promotion(client, model["id"], args.environment, dep["id"], watch=args.watch)
    print(json.dumps({"model_id": model["id"], "deployment_id": dep["id"],
                      "environment": args.environment}))
    return 0


# -- predict -----------------------------------------------------------------------------

def cmd_predict(args: argparse.Namespace) -> int:
    client = _client(args)
    model = client.model(args.model)
    if args.data is None:
        raw = b"{}"
    elif args.data == "-":
        raw = sys.stdin.buffer.read()
    elif args.data.startswith("@"):
        raw = Path(args.data[1:]).read_bytes()
    else:
        raw = args.data.encode()
    try:
        json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"is not valid JSON: {e}", field="--data") from None
    path = client.predict_path(model["id"], environment=args.environment,
                               deployment=args.deployment, development=args.development)
    with _console().status("waiting for the model (a cold start may take a while)..."):
        result = client.request("POST", path, raw=raw, timeout_s=args.timeout_s)
    print(json.dumps(result) if not isinstance(result, str) else result)
    return 0


# -- environments ------------------------------------------------------------------------

def _promotion_patch(args: argparse.Namespace) -> dict[str, Any]:
    """``promotion_settings`` from ``environments update``'s options."""
    patch: dict[str, Any] = {}
    if args.rolling is not None:
        patch["rolling_deploy"] = args.rolling
    config = {k: getattr(args, k) for k in CONFIG_RANGES if getattr(args, k) is not None}
    # The two modes exclude each other: naming one (non-zero) switches the other off.
    for one, other in (("max_surge_percent", "max_unavailable_percent"),
                       ("max_unavailable_percent", "max_surge_percent")):
        if config.get(one) and other not in config:
            config[other] = 0
    if config:
        patch["rolling_deploy_config"] = config
    if args.cleanup is not None:
        patch["promotion_cleanup_strategy"] = args.cleanup
    return patch


def cmd_environments(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.model == "update" and args.update_args:
        if len(args.update_args) != 2:
            raise RequestError("give the model and the environment: bdn environments "
                               "update MODEL ENV --rolling ...", field="update")
        model_name, env_name = args.update_args
        patch = _promotion_patch(args)
        if not patch:
            raise RequestError("give at least one setting to change, e.g. --rolling "
                               "--max-surge-percent 25", field="update")
        model = client.model(model_name)
        result = client.request(
            "PATCH", f"/v1/models/{q(model['id'])}/environments/{q(env_name)}",
            {"promotion_settings": patch})
        print(json.dumps(result))
        return 0
    if args.update_args:
        raise RequestError(f"unexpected arguments {args.update_args}; did you mean "
                           "`bdn environments update MODEL ENV ...`?", field="update")
    model = client.model(args.model)
    base = f"/v1/models/{q(model['id'])}/environments"
    if args.create:
        env = client.request("POST", base, {"name": args.create})
        _console().print(f"environment [bold]{env['name']}[/] created")
        return 0
    if args.delete:
        client.request("DELETE", f"{base}/{q(args.delete)}")
        _console().print(f"environment [bold]{args.delete}[/] deleted")
        return 0
    envs = client.environments(model["id"])
    if args.json:
        print(json.dumps(envs, indent=2))
        return 0
    from rich.table import Table
    table = Table("environment", "deployment", "status", "previous", "promotion", "traffic",
                  "rolling", "min-max")
    for e in envs:
        cur = e["current_deployment"] or {}
        promo = e.get("in_progress_promotion") or {}
        s = e["autoscaling_settings"]
        ps = e.get("promotion_settings") or {}
        rc = ps.get("rolling_deploy_config") or {}
        rolling = (f"surge {rc.get('max_surge_percent')}%" if rc.get("max_surge_percent")
                   else f"unavailable {rc.get('max_unavailable_percent')}%")
        table.add_row(e["name"], f"{cur.get('name', '')} {cur.get('id', '')}".strip(),
                      cur.get("status", ""), e.get("previous_deployment_id") or "",
                      promo.get("status", "") if promo else "",
                      f"{promo.get('percent_traffic_to_new_version', 0):g}%" if promo else "",
                      rolling if ps.get("rolling_deploy") else "off",
                      f"{s['min_replica']}-{s['max_replica']}")
    _console(stderr=False).print(table)
    return 0
