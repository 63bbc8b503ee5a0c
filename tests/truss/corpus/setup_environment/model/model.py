class Model:
    def __init__(self, environment):
        self.events = [("init", environment)]

    def setup_environment(self, environment):
        self.events.append(("setup_environment", environment))

    def load(self):
        self.events.append(("load", None))

    def predict(self, model_input):
        return self.events
