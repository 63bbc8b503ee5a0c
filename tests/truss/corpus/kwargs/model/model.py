# One class per combination of the arguments Truss passes to a model's constructor
# (config, data_dir, secrets, environment, lazy_data_resolver), named Model_<bits>, plus
# a **kwargs class and a keyword-only class. config.yaml's model_class_name picks one;
# each records what it received so the test can compare with what it asked for.
import itertools

NAMES = ("config", "data_dir", "secrets", "environment", "lazy_data_resolver")


def _make(names):
    params = ", ".join(("self", *names))
    body = "    self.received = {" + ", ".join(f"{n!r}: {n}" for n in names) + "}\n"
    namespace = {}
    exec(f"def __init__({params}):\n{body}", namespace)
    return namespace["__init__"]


class _Base:
    def predict(self, model_input):
        return sorted(self.received)


for bits in itertools.product((0, 1), repeat=len(NAMES)):
    chosen = tuple(n for n, b in zip(NAMES, bits, strict=True) if b)
    name = "Model_" + "".join(map(str, bits))
    globals()[name] = type(name, (_Base,), {"__init__": _make(chosen), "wants": chosen})


class Model(_Base):
    wants = (*NAMES, "weights")

    def __init__(self, **kwargs):
        self.received = kwargs


class ModelKeywordOnly(_Base):
    wants = ("config", "environment")

    def __init__(self, *, config, environment=None):
        self.received = {"config": config, "environment": environment}
