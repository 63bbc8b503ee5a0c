"""Secrets for sources and stores: where they are read from, what formats they take, and
how their values are kept out of logs, errors, job records and manifests.

A ``weights:`` entry names a secret (``auth_secret_name``, as in Truss); the value is read
at mirror time, from the first of:

1. a secrets folder with one file per name (``<dir>/<name>``; ``--secrets-dir`` or
   ``$BDN_SECRETS_DIR``; the layout Truss and Kubernetes secret volumes use), then
2. the environment variable ``BDN_SECRET_<NAME>`` (name upper-cased, every character
   that is not a letter or digit replaced by ``_``).

The mirror service gives each job a tenant's view (:meth:`SecretResolver.for_namespace`):
only ``<dir>/<namespace>/<name>``, no environment, no other namespace.

Formats, by source kind:

* Hugging Face: the token itself (surrounding whitespace ignored).
* S3 / R2: JSON ``{"aws_access_key_id": ..., "aws_secret_access_key": ...,
  "aws_region"?: ..., "aws_session_token"?: ..., "endpoint_url"?: ...}``.
* GCS: a service-account JSON key file (``"type": "service_account"``).

Values only ever leave this module inside a :class:`Secret`, whose ``repr``/``str`` are
redacted, and every value revealed is registered so :func:`scrub` can blank it out of any
text that is about to become a log line, an error or a job record — defence in depth for
libraries that echo request details in their exceptions. :func:`install_log_scrubber` is
the one call that applies it to everything a process logs, tracebacks included. Error
messages here name the secret and what is wrong with it, never its content.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bdn import settings
from bdn.errors import AuthError

REDACTED = "***"
# Shorter values are not scrubbed from text: replacing "a" everywhere would garble
# messages and such a value is not a real credential anyway.
MIN_SCRUB_CHARS = 6
MAX_SECRET_BYTES = 64 * 1024

_registry_lock = threading.Lock()
_registered: set[str] = set()


def env_name(name: str) -> str:
    """``BDN_SECRET_<NAME>`` for a secret name (:func:`bdn.settings.secret_env_name`)."""
    return settings.secret_env_name(name)


def register_secret_value(value: str) -> None:
    """Remember ``value`` (and its JSON-string parts) so :func:`scrub` removes it."""
    parts = {value}
    try:
        doc = json.loads(value)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        parts.update(v for v in doc.values() if isinstance(v, str))
    with _registry_lock:
        _registered.update(p for p in parts if len(p) >= MIN_SCRUB_CHARS)
        _registered.update(p.strip() for p in parts if len(p.strip()) >= MIN_SCRUB_CHARS)


def scrub(text: str) -> str:
    """``text`` with every registered secret value replaced by ``***``."""
    with _registry_lock:
        values = sorted(_registered, key=len, reverse=True)
    for v in values:
        if v in text:
            text = text.replace(v, REDACTED)
    return text


def scrub_record(record: logging.LogRecord) -> None:
    """Scrub a log record in place: its message, its exception text and its stack.

    The traceback is formatted here (and cached in ``exc_text``, where every
    :class:`logging.Formatter` looks first) because the exception's own text is where
    SDKs echo what they were given: an endpoint, a header, a credential.
    """
    if not _registered:
        return
    msg = record.getMessage()
    clean = scrub(msg)
    if clean != msg:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = _FORMATTER.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)


_FORMATTER = logging.Formatter()


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs secret values from every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


_install_lock = threading.Lock()
_hooks_installed = False


def install_log_scrubber() -> None:
    """Keep secret values out of everything this process logs or prints on a crash.

    The one call every entry point makes once logging is configured (``bdn`` at any
    ``-v``, and through it every daemon; ``python -m cache.worker``). Idempotent. It
    covers, in layers: records as they are made (a record factory, so handlers added
    later are covered too), every root handler (records made elsewhere, e.g. rebuilt
    from another process), and uncaught exceptions in the main or any other thread,
    which Python prints without going through logging.
    """
    global _hooks_installed
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
    with _install_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        make_record = logging.getLogRecordFactory()

        def scrubbing_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            scrub_record(record)
            return record

        logging.setLogRecordFactory(scrubbing_factory)
        previous_hook = sys.excepthook

        def excepthook(kind: type[BaseException], value: BaseException,
                       tb: TracebackType | None) -> None:
            if not _registered:
                previous_hook(kind, value, tb)
                return
            sys.stderr.write(scrub("".join(traceback.format_exception(kind, value, tb))))

        sys.excepthook = excepthook

        def thread_excepthook(args: threading.ExceptHookArgs) -> None:
            if args.exc_type is SystemExit:
                return
            name = args.thread.name if args.thread is not None else "?"
            text = "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                      args.exc_traceback))
            sys.stderr.write(scrub(f"Exception in thread {name}:\n{text}"))

        threading.excepthook = thread_excepthook


@dataclass(frozen=True)
class Secret:
    """A secret value with a redacted ``repr``; ``reveal()`` is the one way out."""

    name: str
    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return f"<secret {self.name}>"


@dataclass(frozen=True)
class S3Credentials:
    aws_access_key_id: str
    aws_secret_access_key: str = field(repr=False)
    aws_region: str | None = None
    aws_session_token: str | None = field(default=None, repr=False)
    endpoint_url: str | None = None


class SecretScopeError(AuthError):
    """A secret of another namespace was named; ``namespace`` is the one it belongs to."""

    def __init__(self, message: str, *, namespace: str) -> None:
        super().__init__(message)
        self.namespace = namespace


def secret_namespace(name: str) -> str | None:
    """The ``<namespace>/`` prefix of a secret name, if it has one."""
    prefix, sep, _ = name.partition("/")
    return prefix if sep else None


@dataclass(frozen=True)
class SecretResolver:
    """Reads secrets by name from a folder and the environment.

    A resolver made by :meth:`for_namespace` is a tenant's view: it reads only
    ``<dir>/<namespace>/<name>`` (never the environment, which belongs to the operator,
    nor the folder's top level, where the operator's own secrets such as store
    credentials live), and refuses a ``<other-namespace>/<name>`` prefix.
    """

    secrets_dir: str | None = None
    env: Mapping[str, str] | None = None
    namespace: str | None = None

    @classmethod
    def from_env(cls, secrets_dir: str | None = None) -> SecretResolver:
        return cls(secrets_dir=secrets_dir or settings.SECRETS_DIR.get())

    def for_namespace(self, namespace: str) -> SecretResolver:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", namespace):
            raise AuthError(f"namespace {namespace!r} is not valid")
        folder = os.path.join(self.secrets_dir, namespace) if self.secrets_dir else None
        return SecretResolver(secrets_dir=folder, env={}, namespace=namespace)

    def get(self, name: str) -> Secret:
        prefix = secret_namespace(name)
        if prefix is not None and self.namespace is not None:
            if prefix != self.namespace:
                raise SecretScopeError(f"secret {name!r} belongs to namespace {prefix!r}; a "
                                       f"job in namespace {self.namespace!r} may only use "
                                       "its own secrets", namespace=prefix)
            name = name[len(prefix) + 1:]
        if not re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,127}/)?[A-Za-z0-9_.-]{1,253}",
                            name) or name.rpartition("/")[2] in (".", ".."):
            raise AuthError(f"secret name {name!r} is not valid")
        if self.namespace is not None:
            if "/" in name:
                raise AuthError(f"secret name {name!r} is not valid")
            return self._get_scoped(name)
        if self.secrets_dir:
            path = Path(self.secrets_dir) / name
            try:
                return self._read_file(name, path)
            except FileNotFoundError:
                pass
        value = settings.secret_from_env(name, self.env)
        if value is not None:
            register_secret_value(value)
            return Secret(name, value)
        where = f"{self.secrets_dir}/{name} or " if self.secrets_dir else ""
        raise AuthError(f"secret {name!r} not found (looked for {where}${env_name(name)})")

    def _get_scoped(self, name: str) -> Secret:
        if self.secrets_dir:
            try:
                return self._read_file(name, Path(self.secrets_dir) / name)
            except FileNotFoundError:
                pass
        # The message names the namespace, not the service's folders: tenants need not
        # learn the host's layout.
        raise AuthError(f"secret {name!r} not found among the secrets of namespace "
                        f"{self.namespace!r}")

    @staticmethod
    def _read_file(name: str, path: Path) -> Secret:
        """The secret in ``path``; :class:`FileNotFoundError` when there is none."""
        try:
            data = path.read_bytes()[:MAX_SECRET_BYTES + 1]
        except FileNotFoundError:
            raise
        except OSError as e:
            raise AuthError(f"secret {name!r}: cannot read it: {e.strerror}") from None
        if len(data) > MAX_SECRET_BYTES:
            raise AuthError(f"secret {name!r} is larger than {MAX_SECRET_BYTES} bytes")
        value = data.decode("utf-8", errors="replace")
        register_secret_value(value)
        return Secret(name, value)


# -- formats -------------------------------------------------------------------------


def hf_token(secret: Secret) -> str:
    token = secret.reveal().strip()
    if not token or any(c.isspace() for c in token):
        raise AuthError(f"secret {secret.name!r} is not a Hugging Face token "
                        "(expected one line without spaces)")
    return token


def _json_object(secret: Secret, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(secret.reveal())
    except ValueError:
        raise AuthError(f"secret {secret.name!r} is not valid {what} JSON") from None
    if not isinstance(doc, dict):
        raise AuthError(f"secret {secret.name!r} is not valid {what} JSON (expected an object)")
    return doc


def s3_credentials(secret: Secret) -> S3Credentials:
    doc = _json_object(secret, "S3 credentials")
    missing = [k for k in ("aws_access_key_id", "aws_secret_access_key")
               if not isinstance(doc.get(k), str) or not doc[k]]
    if missing:
        raise AuthError(f"secret {secret.name!r} is not valid S3 credentials JSON: missing "
                        f"{', '.join(missing)}")
    optional = ("aws_region", "aws_session_token", "endpoint_url")
    for k in optional:
        if doc.get(k) is not None and not isinstance(doc[k], str):
            raise AuthError(f"secret {secret.name!r}: {k} must be a string")
    return S3Credentials(doc["aws_access_key_id"], doc["aws_secret_access_key"],
                         doc.get("aws_region"), doc.get("aws_session_token"),
                         doc.get("endpoint_url"))


def gcs_service_account(secret: Secret) -> dict[str, Any]:
    doc = _json_object(secret, "GCS service-account")
    if doc.get("type") != "service_account" or not doc.get("client_email") or \
            not doc.get("private_key"):
        raise AuthError(f"secret {secret.name!r} is not a GCS service-account key "
                        "(need type=service_account, client_email, private_key)")
    return doc


# -- store credentials ---------------------------------------------------------------


def store_storage_options(url: str, *, endpoint_url: str | None = None,
                          secret: Secret | None = None) -> dict[str, Any] | None:
    """fsspec ``storage_options`` for a blob store root on ``s3://`` or ``gs://``.

    ``secret`` uses the same formats as sources (S3 JSON, GCS service-account JSON);
    without one, the SDK's default credential chain applies (instance role, workload
    identity), or anonymous access against an emulator ``endpoint_url``.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    if scheme in ("s3", "r2"):
        opts: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
        creds = s3_credentials(secret) if secret else None
        endpoint = endpoint_url or (creds.endpoint_url if creds else None)
        if endpoint:
            opts["endpoint_url"] = endpoint
        if creds:
            opts.update(key=creds.aws_access_key_id, secret=creds.aws_secret_access_key)
            if creds.aws_session_token:
                opts["token"] = creds.aws_session_token
            if creds.aws_region:
                opts["client_kwargs"] = {"region_name": creds.aws_region}
        return opts
    if scheme in ("gs", "gcs"):
        opts = {"skip_instance_cache": True}
        if endpoint_url:
            opts["endpoint_url"] = endpoint_url
        if secret:
            opts["token"] = gcs_service_account(secret)
        elif endpoint_url:
            opts["token"] = "anon"
        return opts
    return None
