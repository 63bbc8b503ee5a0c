# The seed documentation's error-handling example: a three-level chain whose innermost
# chainlet raises ValueError, which bubbles up to the entrypoint.
import truss_chains as chains


def validate_data(data: str) -> None:
    if len(data) > 30:
        raise ValueError(f"This input is too long: {len(data)}.")


class TextReplicator(chains.ChainletBase):
    async def run_remote(self, data: str) -> str:
        validate_data(data)
        return data * 2


class TextToNum(chains.ChainletBase):
    def __init__(self, replicator=chains.depends(TextReplicator, retries=3)) -> None:
        self._replicator = replicator

    async def run_remote(self, data: str) -> int:
        generated_text = await self._replicator.run_remote(data)
        return len(generated_text)


@chains.mark_entrypoint
class ItestChain(chains.ChainletBase):
    def __init__(self, text_to_num=chains.depends(TextToNum)) -> None:
        self._text_to_num = text_to_num

    async def run_remote(self, length: int) -> int:
        value = await self._text_to_num.run_remote("x" * length)
        return value
