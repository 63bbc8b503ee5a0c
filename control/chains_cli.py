"""``bdn chains push FILE``: a chain file becomes one deployment per chainlet.

The client imports the chain (validating it as the documentation promises, before
anything is sent), writes a model folder per chainlet into a temporary directory
(``bdn_chains.codegen``), uploads the files the server lacks, and creates the whole chain
with one ``POST /v1/chains``. ``--watch`` pushes the development chain deployment and
re-pushes when a file next to the chain file changes; weights already mirrored are not
fetched again.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from control.cli import _client, _client_args, _console, _snapshot
from control.client import ControlClient
from control.errors import RequestError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("chains", help="deploy and run Chains (truss_chains files)")
    sub = p.add_subparsers(dest="chains_command", metavar="ACTION", required=True)
    s = sub.add_parser("push", help="deploy a chain file: one deployment per chainlet")
    _client_args(s)
    s.add_argument("file", type=Path, help="the Python file with the chainlets")
    s.add_argument("--watch", action="store_true",
                   help="push the development deployment and re-push on every change")
    s.add_argument("--development", action="store_true",
                   help="push the development deployment once, without watching")
    s.add_argument("--environment", help="promote every chainlet to this environment "
                   "(default production; not with --watch)")
    s.add_argument("--name", help="chain name (default: the entrypoint's name)")
    s.set_defaults(handler=cmd_chains_push)


def push_chain(client: ControlClient, file: Path, *, name: str | None, development: bool,
               environment: str | None) -> dict[str, Any]:
    """Generate, upload and create a chain; returns the server's answer."""
    from bdn_chains.codegen import generate, load_chain
    from control.push import list_folder

    chain = load_chain(file, name)
    with tempfile.TemporaryDirectory(prefix="bdn-chain-") as tmp:
        folders = generate(chain, Path(tmp))
        chainlets = []
        for desc in chain.chainlets:
            root = folders[desc.name]
            files = list_folder(root)
            digests = sorted({f.digest for f in files})
            missing = set(client.request("POST", "/v1/uploads/missing",
                                         {"digests": digests})["missing"])
            for f in files:
                if f.digest in missing:
                    client.upload(f"/v1/uploads/{f.digest}", root / f.path)
                    missing.discard(f.digest)
            from bdn_chains.codegen import model_name
            chainlets.append({"name": desc.name, "model_name": model_name(chain, desc),
                              "files": [{"path": f.path, "digest": f.digest,
                                         "executable": f.executable} for f in files]})
    body: dict[str, Any] = {"name": chain.name, "entrypoint": chain.entrypoint.name,
                            "chainlets": chainlets, "development": development}
    if environment:
        body["environment"] = environment
    answer = client.request("POST", "/v1/chains", body, timeout_s=3600)
    dep = answer["deployment"]
    where = ("development" if development
             else f"environments/{answer['environment']}" if answer.get("environment")
             else f"deployment/{dep['id']}")
    answer["run_remote_url"] = f"{client.base_url}/chains/{answer['id']}/{where}/run_remote"
    return dict(answer)


def cmd_chains_push(args: argparse.Namespace) -> int:
    development = args.watch or args.development
    if development and args.environment:
        raise RequestError("--watch pushes the development deployment, which is not "
                           "promoted; leave out --environment", field="--environment")
    client = _client(args)
    answer = push_chain(client, args.file, name=args.name, development=development,
                        environment=args.environment)
    print(json.dumps(answer))
    if not args.watch:
        return 0
    console = _console()
    root = args.file.resolve().parent
    console.print(f"watching {root} for changes (Ctrl-C to stop)")
    before = _snapshot(root)
    import time
    while True:
        # A file watch by polling: a person's edit, not a test's synchronisation.
        time.sleep(1.0)
        now = _snapshot(root)
        if now != before:
            before = now
            try:
                answer = push_chain(client, args.file, name=args.name, development=True,
                                    environment=None)
                console.print(f"re-pushed chain {answer['id']} (development)")
            except Exception as e:  # keep watching: the next save may fix it
                console.print(f"[red]push failed:[/] {e}")
