# predict returns a generator: Truss streams what it yields. The second item waits for
# the test to write to the FIFO named in the input, so the test can see the first item
# arrive while the model is still producing.


class Model:
    def predict(self, model_input):
        yield "first\n"
        with open(model_input["gate"]) as gate:
            gate.read()
        yield "second\n"
        yield b"bytes too\n"
