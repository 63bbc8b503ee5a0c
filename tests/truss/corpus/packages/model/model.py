from helper_pkg import shout
from shared_lib import PREFIX


class Model:
    def predict(self, model_input):
        return PREFIX + shout(model_input["text"])
