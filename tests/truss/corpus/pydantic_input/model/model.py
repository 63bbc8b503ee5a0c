from __future__ import annotations

import pydantic


class Request(pydantic.BaseModel):
    prompt: str
    max_tokens: int = 16


class Response(pydantic.BaseModel):
    text: str
    tokens: int


class Model:
    def predict(self, model_input: Request) -> Response:
        assert isinstance(model_input, Request)
        return Response(text=model_input.prompt.upper(), tokens=model_input.max_tokens)
