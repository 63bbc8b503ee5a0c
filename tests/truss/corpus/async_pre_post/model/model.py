import asyncio


class Model:
    def __init__(self, **kwargs):
        pass

    async def preprocess(self, model_input):
        await asyncio.sleep(0)
        return {"steps": ["pre"], "x": model_input["x"]}

    def predict(self, model_input):
        model_input["steps"].append("predict")
        model_input["x"] *= 2
        return model_input

    async def postprocess(self, model_output):
        await asyncio.sleep(0)
        model_output["steps"].append("post")
        return model_output
