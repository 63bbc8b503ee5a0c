# A chain whose dependency reports what its replica can see of the control plane's keys:
# the transport key it calls other chainlets with, and whether the admin key leaked.
import os

import truss_chains as chains


class Probe(chains.ChainletBase):
    async def run_remote(self) -> dict[str, str | bool | None]:
        return {"transport_key": os.environ.get("BDN_CHAINS_API_KEY"),
                "admin_key_seen": "BDN_API_KEY" in os.environ}


@chains.mark_entrypoint
class Entry(chains.ChainletBase):
    def __init__(self, probe=chains.depends(Probe)) -> None:
        self._probe = probe

    async def run_remote(self) -> dict[str, str | bool | None]:
        return await self._probe.run_remote()
