"""CLI: ``bdn mirror-server`` (run the mirror service) and ``bdn mirror-keygen`` (make an
API key and the line for the keys file, which stores only its hash)."""

from __future__ import annotations

import argparse
import json
import os

from bdn.cli_store import add_store_args
from bdn.transfer.options import DEFAULT_CONCURRENCY, DEFAULT_PART_BYTES


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("mirror-server", help="run the mirror service (authenticated HTTP API)")
    p.add_argument("--listen", default="127.0.0.1:8470", help="HOST:PORT or unix:PATH "
                   "(port 0 picks a free one; the bound URL is printed as BDN_LISTENING)")
    add_store_args(p)
    p.add_argument("--state-dir", default=os.path.expanduser("~/.bdn/mirror-server"),
                   help="where jobs (LMDB) and spooled downloads live")
    p.add_argument("--keys", required=True, help="API keys file (YAML; see mirror-keygen)")
    p.add_argument("--secrets-dir", default=None,
                   help="folder with one file per secret (default: $BDN_SECRETS_DIR); "
                        "BDN_SECRET_<NAME> environment variables also work")
    p.add_argument("--spool-dir", default=None, help="temp space for downloads "
                   "(default: <state-dir>/spool)")
    p.add_argument("--hf-endpoint", default=None, help="Hugging Face Hub URL "
                   "(default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--s3-endpoint-url", default=None, help="endpoint for s3:// sources")
    p.add_argument("--gcs-endpoint-url", default=None, help="endpoint for gs:// sources")
    p.add_argument("--max-jobs", type=int, default=2, help="jobs running at once")
    p.add_argument("--max-requests", type=int, default=32,
                   help="ranged requests in flight across all jobs")
    p.add_argument("--job-concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="ranged requests in flight per job")
    p.add_argument("--write-workers", type=int, default=8, help="store uploads per job")
    p.add_argument("--part-mib", type=int, default=DEFAULT_PART_BYTES >> 20,
                   help="size of one ranged request, MiB")
    p.add_argument("--allow-local-root", action="append", default=[], metavar="DIR",
                   help="folder API jobs may mirror from with file:// (repeatable; none by "
                        "default: jobs cannot read this host)")
    p.add_argument("--allow-ambient-credentials", action="store_true",
                   help="let API jobs read s3:// r2:// gs:// sources with this service's own "
                        "credentials (no secret, or AWS_OIDC/GCP_OIDC); off by default, "
                        "since those credentials can read the operator's buckets")
    p.set_defaults(handler=cmd_mirror_server)

    k = sub.add_parser("mirror-keygen", help="make an API key for the mirror service")
    k.add_argument("--name", required=True, help="who the key is for")
    k.add_argument("--namespace", action="append", required=True, metavar="NS",
                   help="namespace the key may use (repeatable; '*' for all)")
    k.set_defaults(handler=cmd_mirror_keygen)


def cmd_mirror_server(args: argparse.Namespace) -> int:
    from bdn.mirror_service import ServiceOptions, run_server
    from bdn.store import default_store_url

    options = ServiceOptions(
        store_url=args.store or default_store_url(), state_dir=args.state_dir,
        keys_file=args.keys, secrets_dir=args.secrets_dir, spool_dir=args.spool_dir,
        store_endpoint_url=args.store_endpoint_url, store_secret=args.store_secret,
        hf_endpoint=args.hf_endpoint, s3_endpoint_url=args.s3_endpoint_url,
        gcs_endpoint_url=args.gcs_endpoint_url, max_jobs=args.max_jobs,
        max_requests=args.max_requests, job_concurrency=args.job_concurrency,
        write_workers=args.write_workers, part_bytes=args.part_mib << 20,
        allow_local_roots=tuple(os.path.abspath(d) for d in args.allow_local_root),
        allow_ambient_credentials=args.allow_ambient_credentials)
    return run_server(options, args.listen)


def cmd_mirror_keygen(args: argparse.Namespace) -> int:
    from bdn.mirror_service import hash_key, new_api_key

    key = new_api_key()
    print(f"API key (shown once; give it to {args.name}): {key}")
    print("add to the keys file:")
    print(f"  - name: {json.dumps(args.name)}\n    sha256: {hash_key(key)}\n"
          f"    namespaces: {json.dumps(args.namespace)}")
    return 0
