import asyncio


class Model:
    def __init__(self, config):
        self.config = config

    async def predict(self, model_input):
        for i in range(model_input.get("n", 3)):
            await asyncio.sleep(0)
            yield f"token-{i}\n"
        if model_input.get("gate"):
            # Block (off the event loop) until the test writes to the FIFO.
            await asyncio.to_thread(lambda: open(model_input["gate"]).read())
            yield "after-gate\n"
