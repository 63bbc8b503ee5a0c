"""CLI commands of the ``bdn`` package: mirror, export, manifest show, store stats/refs.

Also :func:`store_failure`, which ``bdn.cli.main`` uses to turn a store SDK's own
exception (no credentials, an endpoint that refuses) into one line naming the store, its
endpoint and where its credentials came from: every command that takes ``--store``
shares the flags defined here, so it is the one place that knows what they mean.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from bdn.errors import SourceError, StoreError
from bdn.progress import byte_progress, human_bytes, human_rate
from bdn.secrets import scrub
from bdn.store import BlobStore, default_store_url
from manifests.digest import Digest
from manifests.refs import Ref


def add_store_args(p: argparse.ArgumentParser, *, secrets_dir: bool = False) -> None:
    """The store flags every command and daemon takes alike (``open_store`` reads them);
    ``secrets_dir`` adds ``--secrets-dir`` for commands with no source secrets of their own."""
    p.add_argument("--store", default=None,
                   help="blob store URL or folder (default: $BDN_STORE or ~/.bdn/store)")
    p.add_argument("--store-endpoint-url", default=None,
                   help="S3/GCS endpoint of an s3:// or gs:// store (compatible stores)")
    p.add_argument("--store-secret", default=None,
                   help="secret name holding the store's credentials (S3 JSON / GCS key)")
    if secrets_dir:
        p.add_argument("--secrets-dir", default=None,
                       help="folder with one file per secret (default: $BDN_SECRETS_DIR)")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("mirror", help="mirror weights from a source into the blob store")
    p.add_argument("source", help="local folder, file://, hf://, s3://, gs:// or r2:// URI")
    p.add_argument("--ref", required=True, help="name for the result: namespace/model:tag")
    p.add_argument("--allow", action="append", default=[], metavar="GLOB",
                   help="only files matching (repeatable)")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="skip files matching (repeatable)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.add_argument("--events", action="store_true",
                   help="print progress events as JSON lines on stdout")
    p.add_argument("--secret", default=None, metavar="NAME",
                   help="secret with the source's credentials (like auth_secret_name)")
    p.add_argument("--secrets-dir", default=None,
                   help="folder with one file per secret (default: $BDN_SECRETS_DIR)")
    p.add_argument("--endpoint-url", default=None,
                   help="endpoint for s3:// / gs:// sources, or the Hub URL for hf://")
    p.add_argument("--server", default=None, metavar="URL",
                   help="run the mirror on this mirror service (API key in "
                        "$BDN_MIRROR_API_KEY) instead of in this process")
    add_store_args(p)
    p.set_defaults(handler=cmd_mirror)

    p = sub.add_parser("export", help="write a mirrored model's files into a folder")
    p.add_argument("ref", help="namespace/model:tag or b3:<manifest digest>")
    p.add_argument("dest", help="destination folder")
    add_store_args(p)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("manifest", help="inspect manifests")
    msub = p.add_subparsers(dest="manifest_cmd", metavar="SUBCOMMAND", required=True)
    show = msub.add_parser("show", help="files, sizes, chunks and sharing of a manifest")
    show.add_argument("ref", help="namespace/model:tag or b3:<manifest digest>")
    show.add_argument("--base", help="compare against this ref: bytes shared vs new")
    show.add_argument("--chunks", action="store_true", help="list every chunk")
    show.add_argument("--json", action="store_true", help="print the manifest document")
    add_store_args(show)
    show.set_defaults(handler=cmd_manifest_show)

    p = sub.add_parser("store", help="inspect the blob store")
    ssub = p.add_subparsers(dest="store_cmd", metavar="SUBCOMMAND", required=True)
    st = ssub.add_parser("stats", help="objects, bytes stored, logical bytes referenced")
    st.add_argument("--json", action="store_true")
    add_store_args(st)
    st.set_defaults(handler=cmd_store_stats)
    refs = ssub.add_parser("refs", help="list refs")
    refs.add_argument("--json", action="store_true",
                      help='print [{"ref": ..., "digest": ...}, ...]')
    add_store_args(refs)
    refs.set_defaults(handler=cmd_store_refs)


def open_store(args: argparse.Namespace, url: str | None = None) -> BlobStore:
    """The blob store the flags of :func:`add_store_args` name: ``--store`` (or ``url``,
    a daemon's resolved default), with ``--store-endpoint-url`` and the credentials of
    ``--store-secret`` read from ``--secrets-dir``. Every command and daemon opens its
    store here, so the same flags mean the same store everywhere."""
    url = url or args.store or default_store_url()
    endpoint = getattr(args, "store_endpoint_url", None)
    secret_name = getattr(args, "store_secret", None)
    if not endpoint and not secret_name:
        return BlobStore(url)
    from bdn.secrets import SecretResolver, store_storage_options
    from bdn.store import StoreOptions

    secret = SecretResolver.from_env(getattr(args, "secrets_dir", None)).get(secret_name) \
        if secret_name else None
    return BlobStore(url, StoreOptions(storage_options=store_storage_options(
        url, endpoint_url=endpoint, secret=secret)))


def cmd_mirror(args: argparse.Namespace) -> int:
    from bdn.config import Auth
    from bdn.mirror import Mirror
    from bdn.secrets import SecretResolver
    from bdn.sources import open_source

    ref = Ref.parse(args.ref)
    _check_source_spelling(args.source)
    if args.server:
        from bdn.mirror_client import mirror_via_server

        return mirror_via_server(args, ref)
    store = open_store(args)
    auth = Auth("CUSTOM_SECRET", auth_secret_name=args.secret) if args.secret else None
    endpoint = args.endpoint_url
    source = open_source(args.source, secrets=SecretResolver.from_env(args.secrets_dir),
                         auth=auth, endpoint_url=endpoint, hf_endpoint=endpoint)
    events = args.events

    def emit_json(event: dict[str, Any]) -> None:
        print(json.dumps(event), flush=True)

    try:
        with byte_progress("mirror", enabled=not (args.json or events)) as bar:
            progress = emit_json if events else bar
            result = Mirror(store).run(source, ref=ref, allow=args.allow, ignore=args.ignore,
                                       progress=progress)
    finally:
        source.close()
    s = result.stats
    if args.json or events:
        print(json.dumps({"event": "summary", **result.to_dict()} if events
                         else result.to_dict()), flush=True)
        return 0
    rate = s.logical_bytes / s.seconds if s.seconds else 0.0
    print(f"mirrored {args.source} → {ref} = {result.manifest_digest}")
    print(f"  {s.files} files, {human_bytes(s.logical_bytes)} logical "
          f"({s.files_reused} files known by fingerprint)")
    print(f"  uploaded {human_bytes(s.bytes_uploaded)} in {s.objects_new} new objects; "
          f"reused {s.objects_reused} objects ({human_bytes(s.bytes_reused)})")
    print(f"  {s.seconds:.2f} s, {human_rate(rate)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bdn.export import export_manifest

    store = open_store(args)
    digest, manifest = store.resolve(args.ref)
    with byte_progress("export") as bar:
        bar({"event": "listed", "bytes": manifest.total_size})
        stats = export_manifest(store, manifest, args.dest, progress=bar)
    print(f"exported {args.ref} ({digest.short}) → {args.dest}: {stats.files} files, "
          f"{human_bytes(stats.bytes_written)} written, {stats.hardlinks} hardlinks")
    return 0


def cmd_manifest_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    digest, m = store.resolve(args.ref)
    if args.json:
        sys.stdout.write(m.canonical_bytes().decode() + "\n")
        return 0
    print(f"manifest {digest}")
    for k, v in sorted(m.source.items()):
        print(f"  {k}: {v}")
    print(f"  {len(m.files)} files, {human_bytes(m.total_size)} logical, "
          f"{len(m.unique_chunks())} unique chunks ({human_bytes(m.unique_size)})")
    for f in m.files:
        print(f"  {f.size:>14,d}  {len(f.chunks):>5} chunks  {f.digest.short}  {f.path}")
        if args.chunks:
            for c in f.chunks:
                enc = "" if c.encoding == "raw" else f" {c.encoding} {c.stored_length:,d}"
                print(f"      @{c.offset:<14,d} {c.length:>12,d}  {c.digest.short}{enc}")
    # Shared vs new: against --base, or else against every other manifest in the store.
    if args.base:
        _, base = store.resolve(args.base)
        others: set[Digest] = set(base.unique_chunks())
        against = args.base
    else:
        others = set()
        for other in store.list_manifests():
            if other != digest:
                others |= set(store.get_manifest(other).unique_chunks())
        against = "the other manifests in the store"
    mine = m.unique_chunks()
    shared = sum(c.length for d, c in mine.items() if d in others)
    new = sum(c.length for d, c in mine.items() if d not in others)
    print(f"  against {against}: {human_bytes(shared)} shared, {human_bytes(new)} new "
          f"({sum(1 for d in mine if d not in others)} new chunks)")
    return 0


def cmd_store_stats(args: argparse.Namespace) -> int:
    store = open_store(args)
    stats = store.stats()
    if args.json:
        print(json.dumps({"store": store.url, **stats}))
        return 0
    print(f"store {store.url}")
    print(f"  objects:                  {stats['objects']:,d}")
    print(f"  bytes stored:             {human_bytes(stats['bytes_stored'])}")
    print(f"  manifests / refs:         {stats['manifests']} / {stats['refs']}")
    print(f"  logical bytes referenced: {human_bytes(stats['logical_bytes_referenced'])}")
    print(f"  unique bytes referenced:  {human_bytes(stats['unique_bytes_referenced'])}")
    return 0


def cmd_store_refs(args: argparse.Namespace) -> int:
    refs = list(open_store(args).list_refs())
    if args.json:
        print(json.dumps([{"ref": str(ref), "digest": str(digest)} for ref, digest in refs]))
        return 0
    for ref, digest in refs:
        print(f"{ref}\t{digest}")
    return 0


# A bare ``owner/repo``: what a Hugging Face repo id looks like.
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _check_source_spelling(source: str) -> None:
    """A source that is neither a URI nor an existing path but looks like a Hugging
    Face repo id gets a suggestion instead of "not a directory"."""
    if "://" in source or Path(source).exists() or not _HF_REPO_ID.fullmatch(source):
        return
    raise SourceError(f"{source} is neither a URI nor a local folder; for the Hugging "
                      f"Face repo, write hf://{source}", source=source)


# Packages whose own exceptions (or frames) mark a failure inside a remote store's SDK.
STORE_SDK_PACKAGES = frozenset({"botocore", "aiobotocore", "boto3", "s3fs", "gcsfs",
                                "google", "aiohttp", "fsspec", "urllib3", "requests"})


def store_failure(args: argparse.Namespace, exc: BaseException) -> StoreError | None:
    """A :class:`StoreError` saying which store failed how and with which credentials,
    when ``exc`` came out of a store SDK under ``bdn.store``; else None (a bug of ours
    keeps its traceback)."""
    modules = [frame.f_globals.get("__name__", "")
               for frame, _ in traceback.walk_tb(exc.__traceback__)]
    roots = {m.partition(".")[0] for m in modules}
    from_sdk = type(exc).__module__.partition(".")[0] in STORE_SDK_PACKAGES or (
        isinstance(exc, OSError) and bool(roots & STORE_SDK_PACKAGES))
    if not from_sdk or "bdn.store" not in modules:
        return None
    url = getattr(args, "store", None) or default_store_url()
    endpoint = getattr(args, "store_endpoint_url", None)
    what = " ".join(scrub(str(exc)).split()) or "no detail"
    at = f" (endpoint {endpoint})" if endpoint else ""
    return StoreError(f"store {url}{at} failed: {type(exc).__name__}: {what}; credentials "
                      f"from {credential_source(url, getattr(args, 'store_secret', None))}",
                      url=url)


def credential_source(url: str, secret_name: str | None) -> str:
    """Where the credentials for store ``url`` come from, in words; never their value."""
    if secret_name:
        return f"secret {secret_name} (--store-secret)"
    scheme = url.partition("://")[0] if "://" in url else "file"
    if scheme in ("s3", "r2"):
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            return "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment"
        if os.environ.get("AWS_PROFILE"):
            return f"AWS profile {os.environ['AWS_PROFILE']} (AWS_PROFILE)"
        return ("the default AWS chain (AWS_* environment, ~/.aws/credentials, instance "
                "role); give --store-secret NAME to use a secret")
    if scheme in ("gs", "gcs"):
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            return (f"key file {os.environ['GOOGLE_APPLICATION_CREDENTIALS']} "
                    "(GOOGLE_APPLICATION_CREDENTIALS)")
        return ("Google application default credentials (gcloud, metadata server); give "
                "--store-secret NAME to use a key")
    return "this process's file permissions"
