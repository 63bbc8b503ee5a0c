# The seed documentation's local-development example (PhiLLM mocked in tests).

import asyncio

import pydantic
import truss_chains as chains


class Messages(pydantic.BaseModel):
    messages: list[dict[str, str]]


class PhiLLM(chains.ChainletBase):
    remote_config = chains.RemoteConfig(
        docker_image=chains.DockerImage(pip_requirements=["transformers==4.41.2"]),
        compute=chains.Compute(cpu_count=1, memory="1Gi"))

    async def run_remote(self, messages: Messages) -> str:
        return "a poem about " + messages.messages[-1]["content"].split(" ")[-1]


@chains.mark_entrypoint
class PoemGenerator(chains.ChainletBase):
    def __init__(self, phi_llm: PhiLLM = chains.depends(PhiLLM)) -> None:
        self._phi_llm = phi_llm

    async def run_remote(self, words: list[str]) -> list[str]:
        tasks = []
        for word in words:
            messages = Messages(messages=[
                {"role": "system", "content": "You are poet who writes short poetry."},
                {"role": "user", "content": f"Write a poem about {word}"}])
            tasks.append(asyncio.ensure_future(self._phi_llm.run_remote(messages)))
            await asyncio.sleep(0)  # Yield to event loop, to allow starting tasks.
        return list(await asyncio.gather(*tasks))
