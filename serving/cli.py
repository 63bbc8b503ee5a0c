"""``bdn serve``: run a model folder behind the model server.

Registered into the ``bdn`` CLI by :func:`register`. Imports of torch and the server
are deferred to the handler, so other ``bdn`` commands do not pay for them.

Where the weights come from, in order:

* ``--weights-dir DIR`` (or ``$BDN_WEIGHTS_DIR``): the first ``weights:`` entry's files
  are in DIR — for running a model locally without the agent;
* otherwise each entry's ``mount_location``, where the node agent mounts them;
* ``--pull-events URL`` (or ``$BDN_PULL_EVENTS``): the agent's event stream for the
  pull of the first entry; the loader then starts before the files are complete.
"""

from __future__ import annotations

import argparse
from typing import Any

from bdn import settings
from bdn.units import byte_size_arg
from manifests.errors import BdnError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="run a Truss-like model folder (config.yaml + model/model.py)",
        description="Serve MODEL_DIR: POST /predict, GET /health/live, /health/ready, "
                    "/metrics. Prints 'BDN_LISTENING <url>' once bound.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--listen", default="127.0.0.1:8080",
                   help="HOST:PORT (port 0: a free one) or unix:PATH (default %(default)s)")
    p.add_argument("--weights-dir", default=settings.WEIGHTS_DIR.get(),
                   help="folder holding the first weights: entry's files (overrides its "
                        "mount_location; default $BDN_WEIGHTS_DIR)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the loader puts tensors (auto: cuda if available)")
    p.add_argument("--pull-events", default=settings.PULL_EVENTS.get(),
                   metavar="URL",
                   help="node agent event stream of the weights pull "
                        "(http://HOST:PORT/v1/pulls/ID/events or "
                        "http+unix://<quoted socket path>/v1/pulls/ID/events)")
    p.add_argument("--max-body-bytes", type=byte_size_arg, default=None, metavar="N",
                   help="refuse request bodies larger than N bytes (e.g. 64M) with 413 "
                        "(default 64 MiB)")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="requests that may wait (reading their body, parsed, or queued "
                        "for a predict slot) before the next gets 429 with Retry-After "
                        "(default 16 x predict_concurrency)")
    p.add_argument("--body-timeout-s", type=float, default=None, metavar="S",
                   help="answer 408 when a request body has not fully arrived within S "
                        "seconds (default 60)")
    p.set_defaults(handler=serve)


def serve(args: argparse.Namespace) -> int:
    from bdn.service import ListenAddress
    from serving.readiness import EventStreamReadiness, ReadinessSource
    from serving.runtime import ModelRuntime
    from serving.server import ServeLimits

    listen = ListenAddress.parse(args.listen)
    given = {"max_body_bytes": args.max_body_bytes, "max_queue": args.max_queue,
             "body_timeout_s": args.body_timeout_s}
    limits = ServeLimits(**{k: v for k, v in given.items() if v is not None})
    # The folder and its config are checked before torch is imported (seconds), so a
    # broken model folder fails fast.
    rt = ModelRuntime(args.model_dir, device="cpu", weights_dir=args.weights_dir)

    import torch

    from serving.server import run_server

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise BdnError("--device cuda: CUDA is not available on this machine")
    rt.set_device(device)
    readiness: ReadinessSource | None = None
    if args.pull_events:
        mounts = rt.weights.mounts
        if not mounts:
            raise BdnError("--pull-events needs a weights: entry (or --weights-dir)")
        readiness = EventStreamReadiness(args.pull_events, str(mounts[0].path))
        rt.use_readiness(readiness)
    try:
        return run_server(rt, listen, limits)
    finally:
        if readiness is not None:
            readiness.close()
