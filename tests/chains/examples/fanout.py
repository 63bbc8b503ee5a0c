# A parallel fan-out: the entrypoint calls Worker 8 times with asyncio.gather. Each Worker
# call waits until all 8 have arrived (bounded), which only happens if they run at once.
import asyncio

import truss_chains as chains

FAN_OUT = 8
ARRIVAL_TIMEOUT_S = 60.0

_arrived = 0
_all_here: asyncio.Event | None = None


class Worker(chains.ChainletBase):
    async def run_remote(self, index: int) -> int:
        global _arrived, _all_here
        if _all_here is None:
            _all_here = asyncio.Event()
        _arrived += 1
        if _arrived >= FAN_OUT:
            _all_here.set()
        await asyncio.wait_for(_all_here.wait(), ARRIVAL_TIMEOUT_S)
        return index * index


@chains.mark_entrypoint
class FanOut(chains.ChainletBase):
    def __init__(self, worker=chains.depends(Worker)) -> None:
        self._worker = worker

    async def run_remote(self, n: int) -> list[int]:
        return list(await asyncio.gather(*(self._worker.run_remote(i) for i in range(n))))
