# Streaming outputs: a dependency streams words, the entrypoint streams them on upper-cased.
from collections.abc import AsyncIterator

import truss_chains as chains


class Words(chains.ChainletBase):
    async def run_remote(self, text: str) -> AsyncIterator[str]:
        for word in text.split():
            yield word + "\n"


@chains.mark_entrypoint
class Upper(chains.ChainletBase):
    def __init__(self, words=chains.depends(Words)) -> None:
        self._words = words

    async def run_remote(self, text: str) -> AsyncIterator[str]:
        async for word in self._words.run_remote(text):
            yield word.upper()
