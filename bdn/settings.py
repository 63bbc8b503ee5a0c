"""Every ``BDN_*`` environment variable bdn reads, in one table, and the one place that
reads them.

Each variable is a :class:`Setting`: its name, its default, the function that parses it
and a one-line doc. Modules do not read ``os.environ`` for a ``BDN_*`` name themselves
(tests/core/test_core_settings.py greps the tree for that); they call the accessor here,
which reads the environment *at call time*, so a test or a parent process that sets a
variable for one process is obeyed, and nothing is cached at import.

The rules are the same for every variable: unset and empty (``BDN_X=``) are the same
thing, the default; a value the setting cannot take raises :class:`SettingError`, which
names the variable. The table lives in ``bdn/`` because every package that reads one
(agent, cache, serving, control, bdn_chains) may import ``bdn`` (DESIGN.md's table), and
the module imports nothing heavier than the standard library, so a cache pod or an
agent pays nothing for it.

Where a fallback belongs to a package above ``bdn`` (the agent's socket path, the
control client's URL, serving's ``/secrets``), the setting's default is None and its
doc says what the caller falls back to, so that value still has one definition.

``BDN_SECRET_<NAME>`` is a family, not one variable: :func:`secret_env_name` is the one
mapping of a secret name to its variable (the control plane writes it, the mirror and
the serving runtime read it) and :func:`secret_from_env` the one reader. A secret set to
the empty string is a value, as it always was.

Variables bdn only *sets* for its children (``BDN_DEPLOYMENT_ID``, ``BDN_POD_IP``) and
the ``BDN_LISTENING``/``BDN_READY`` stdout lines are not settings and are not listed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from bdn.errors import SettingError

T = TypeVar("T")

SECRET_ENV_PREFIX = "BDN_SECRET_"
_NAME_RE = re.compile(r"BDN_[A-Z0-9_]+")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One ``BDN_*`` variable: ``parse`` turns its text into the value (raising
    ``ValueError`` or ``TypeError`` for a bad one); ``default`` is the value when it is
    unset or empty, ``default_factory`` computes one that depends on the machine (the
    home folder). ``secret``: the value is a credential, never shown."""

    name: str
    default: T
    parse: Callable[[str], T]
    doc: str
    default_factory: Callable[[], T] | None = None
    secret: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name) or self.name.startswith(SECRET_ENV_PREFIX):
            raise ValueError(f"setting name {self.name!r} must be BDN_ and upper-case "
                             f"letters, digits or '_', outside the {SECRET_ENV_PREFIX}* family")
        if not self.doc.strip():
            raise ValueError(f"setting {self.name} has no doc")

    def get(self, env: Mapping[str, str] | None = None) -> T:
        """The value in ``env`` (default: this process's environment, read now)."""
        raw = (os.environ if env is None else env).get(self.name)
        if raw is None or not raw.strip():
            return self.default_factory() if self.default_factory is not None else self.default
        try:
            return self.parse(raw)
        except (ValueError, TypeError) as e:
            # The parser's message may quote the value: for a credential, say only that.
            why = "its value is not valid (not shown: a secret)" if self.secret else \
                f"not valid: {e}"
            raise SettingError(why, variable=self.name) from None


def _text(raw: str) -> str:
    return raw


def _environment(raw: str) -> dict[str, Any]:
    # Truss's deployment environment: a JSON object, or a bare name.
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {"name": raw}
    return parsed if isinstance(parsed, dict) else {"name": raw}


def _default_store() -> str:
    return str(Path.home() / ".bdn" / "store")


STORE: Setting[str] = Setting(
    "BDN_STORE", "", _text, default_factory=_default_store,
    doc="blob store URL (s3://, gs://) or folder used where --store is not given "
        "(default ~/.bdn/store)")
SECRETS_DIR: Setting[str | None] = Setting(
    "BDN_SECRETS_DIR", None, _text,
    doc="folder with one file per secret (the Truss/Kubernetes secret volume layout); "
        "unset: the mirror reads only BDN_SECRET_<NAME>, `bdn serve` reads /secrets")
MIRROR_API_KEY: Setting[str | None] = Setting(
    "BDN_MIRROR_API_KEY", None, _text, secret=True,
    doc="API key `bdn mirror --server URL` sends to the mirror service")
AGENT_SOCKET: Setting[str | None] = Setting(
    "BDN_AGENT_SOCKET", None, _text,
    doc="unix socket of the node agent's local API (unset: /run/bdn/agent.sock)")
WEIGHTS_DIR: Setting[str | None] = Setting(
    "BDN_WEIGHTS_DIR", None, _text,
    doc="`bdn serve --weights-dir`: folder holding the first weights: entry's files")
PULL_EVENTS: Setting[str | None] = Setting(
    "BDN_PULL_EVENTS", None, _text,
    doc="`bdn serve --pull-events`: the node agent's event stream URL of the weights pull")
ENVIRONMENT: Setting[dict[str, Any] | None] = Setting(
    "BDN_ENVIRONMENT", None, _environment,
    doc="the replica's deployment environment: a JSON object, or a bare name "
        "(set by the control plane; the model's `environment`)")
CONTROL_STATE: Setting[str | None] = Setting(
    "BDN_CONTROL_STATE", None, _text,
    doc="`bdn control-server --state-dir` (unset: $XDG_STATE_HOME/bdn/control, else "
        "~/.local/state/bdn/control)")
REPLICA_COMMAND: Setting[str | None] = Setting(
    "BDN_REPLICA_COMMAND", None, _text,
    doc="`bdn control-server --replica-command`: shell words that run one replica "
        "(unset: this Python's `bdn serve`)")
API_KEY: Setting[str | None] = Setting(
    "BDN_API_KEY", None, _text, secret=True,
    doc="control plane API key: the one the server accepts (unless --api-key-file) and "
        "the one the CLI sends")
CONTROL_URL: Setting[str | None] = Setting(
    "BDN_CONTROL_URL", None, _text,
    doc="control server URL the CLI talks to (unset: http://127.0.0.1:8700)")
CHAINS_URL: Setting[str | None] = Setting(
    "BDN_CHAINS_URL", None, _text,
    doc="control plane URL chainlet replicas call run_remote through (the server's own "
        "when unset)")
CHAINS_API_KEY: Setting[str | None] = Setting(
    "BDN_CHAINS_API_KEY", None, _text, secret=True,
    doc="key a chainlet replica sends with run_remote calls (set by the control plane)")
CHAIN_ID: Setting[str] = Setting(
    "BDN_CHAIN_ID", "", _text,
    doc="the chain a chainlet replica belongs to (set by the control plane)")
CHAIN_DEPLOYMENT_ID: Setting[str] = Setting(
    "BDN_CHAIN_DEPLOYMENT_ID", "", _text,
    doc="the chain deployment a chainlet replica belongs to (set by the control plane)")
REPLICA_ID: Setting[str | None] = Setting(
    "BDN_REPLICA_ID", None, _text,
    doc="this replica's id, set by the control plane (unset: the host name)")
MODEL_ID: Setting[str] = Setting(
    "BDN_MODEL_ID", "", _text,
    doc="the model this replica serves, set by the control plane")

SETTINGS: tuple[Setting[Any], ...] = (
    STORE, SECRETS_DIR, MIRROR_API_KEY, AGENT_SOCKET, WEIGHTS_DIR, PULL_EVENTS,
    ENVIRONMENT, CONTROL_STATE, REPLICA_COMMAND, API_KEY, CONTROL_URL, CHAINS_URL,
    CHAINS_API_KEY, CHAIN_ID, CHAIN_DEPLOYMENT_ID, REPLICA_ID, MODEL_ID)
# The BDN_SECRET_<NAME> family, documented beside the table.
SECRET_FAMILY_DOC = ("BDN_SECRET_<NAME>: the value of secret NAME (upper-cased, every "
                     "character not a letter or digit replaced by '_')")


def secret_env_name(name: str) -> str:
    """``BDN_SECRET_<NAME>`` for a secret name (``my-s3.creds`` → ``BDN_SECRET_MY_S3_CREDS``,
    ``team/hf`` → ``BDN_SECRET_TEAM_HF``)."""
    return SECRET_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def secret_from_env(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """Secret ``name``'s value from ``BDN_SECRET_<NAME>`` in ``env`` (default: this
    process's environment, read now); None when unset. Never logged."""
    return (os.environ if env is None else env).get(secret_env_name(name))

