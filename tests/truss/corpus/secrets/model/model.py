class Model:
    def __init__(self, secrets):
        self._secrets = secrets

    def predict(self, model_input):
        value = self._secrets[model_input["name"]]
        return {"length": len(value)}
