# A Truss model with no __init__ of its own: Truss passes it no arguments.


class Model:
    def load(self):
        self.greeting = "hello"

    def predict(self, model_input):
        return {"greeting": self.greeting, "echo": model_input}
