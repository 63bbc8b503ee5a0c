# The seed documentation's Binary IO example (NumpyArrayField, use_binary=True), plus a
# sync chainlet that raises a custom exception (re-raised as GenericRemoteException).
import asyncio

import pydantic
import truss_chains as chains
from truss_chains import pydantic_numpy


class DataModel(pydantic.BaseModel):
    some_numbers: pydantic_numpy.NumpyArrayField
    other_field: str


class ShoutError(Exception):
    pass


class Worker(chains.ChainletBase):
    async def run_remote(self, data: DataModel) -> DataModel:
        data.some_numbers.array += 10
        return data


class Shouter(chains.ChainletBase):
    def run_remote(self, text: str) -> str:
        if text == "custom":
            raise ShoutError("cannot shout that")
        return text.upper()


@chains.mark_entrypoint
class Consumer(chains.ChainletBase):
    def __init__(self, worker=chains.depends(Worker, use_binary=True),
                 shouter=chains.depends(Shouter)) -> None:
        self._worker = worker
        self._shouter = shouter

    async def run_remote(self, data: DataModel, text: str) -> DataModel:
        result = await self._worker.run_remote(data)
        try:
            result.other_field = await asyncio.to_thread(self._shouter.run_remote, text)
        except chains.GenericRemoteException as e:
            result.other_field = f"generic: {str(e).splitlines()[0]}"
        return result
