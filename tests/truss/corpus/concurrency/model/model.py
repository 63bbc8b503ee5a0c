# Every step prints an event line when it starts and when it is done and, when the input
# names a FIFO for it, blocks until the test writes to that FIFO: the test orders the
# steps of concurrent requests by these events alone.
import sys


def _event(text):
    # One write per line: print() writes the newline separately, and lines from
    # concurrent threads could interleave.
    sys.stdout.write(f"TRUSS_EVENT {text}\n")
    sys.stdout.flush()


def _step(model_input, step):
    _event(f"{step} {model_input['name']}")
    gate = model_input.get("gates", {}).get(step)
    if gate:
        with open(gate) as f:
            f.read()
    _event(f"{step}-done {model_input['name']}")


class Model:
    def preprocess(self, model_input):
        _step(model_input, "pre")
        return model_input

    def predict(self, model_input):
        _step(model_input, "predict")
        return model_input

    def postprocess(self, model_output):
        _step(model_output, "post")
        return {"done": model_output["name"]}
