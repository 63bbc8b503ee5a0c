"""A replica start's pulls: the weights' transfer does not wait behind the code pull.

``bdn serve`` needs its code before it can start, so the delivery awaits the code pull;
the weights need nothing from it, so their pull is asked for first and the transfer
(the long part of a cold start) starts without waiting one code pull's round trips.
A real agent reads the store over HTTP through ``store_http.py --gated``: every object
body is held until the test opens the gate, so the code pull cannot finish before the
test has seen which pulls the agent was given.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from control.backends import ReplicaSpec
from control.delivery import AgentDelivery
from tests.agent.agent_support import Agent, Model, base, store, tuned  # noqa: F401
from tests.cache.conftest import STORE_HTTP
from tests.support.procs import ServiceProcess

# How long the agent may take to show a pull it was asked for (a loaded machine).
PULL_VISIBLE_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02


def test_weights_pull_is_started_before_the_code_pull_is_awaited(
        tmp_path: Path, store: Path, base: Model, tuned: Model) -> None:  # noqa: F811
    origin = ServiceProcess([sys.executable, STORE_HTTP, str(store), "--listen",
                             "127.0.0.1:0", "--stall-after", "0", "--gated"],
                            env={"PYTHONPATH": os.getcwd()})
    agent = Agent(tmp_path, extra=("--store", origin.url))
    try:
        delivery = AgentDelivery(f"unix:{agent.socket}", tmp_path / "mounts")
        spec = ReplicaSpec(model_id="m1", deployment_id="d1", deployment_name="dep",
                           model_dir="", code=str(base.digest),
                           weights=({"source": f"file://{tuned.src}", "ref": str(tuned.digest),
                                     "mount_location": "/weights"},))
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(asyncio.run, delivery.prepare(spec, "d1-r1"))
            try:
                # The code pull is held at the gate; the weights pull must exist already.
                deadline = time.monotonic() + PULL_VISIBLE_TIMEOUT_S
                while len(agent.client.pulls()) < 2 and time.monotonic() < deadline:
                    assert not job.done(), job.exception()
                    time.sleep(POLL_INTERVAL_S)  # a bounded poll on the agent's answer
                started = len(agent.client.pulls())
            finally:
                urllib.request.urlopen(urllib.request.Request(
                    f"{origin.url}/_gate/open", method="POST"), timeout=10).read()
            prepared = job.result(timeout=120)
        assert started == 2, "the weights pull waited for the code pull to finish"
        code_pull, weights_pull = prepared.pulls
        assert prepared.weights_pull == weights_pull
        assert agent.client.status(code_pull)["manifests"] == [str(base.digest)]
        assert agent.client.status(weights_pull)["manifests"] == [str(tuned.digest)]
        assert (Path(prepared.model_dir) / "config.json").is_file()
        asyncio.run(delivery.release(prepared))
    finally:
        agent.stop()
        origin.stop()
