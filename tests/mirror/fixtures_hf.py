"""A Hugging Face Hub stand-in (aiohttp) serving the routes ``huggingface_hub`` 2.x calls.

Selected by ``HF_ENDPOINT`` (or ``HFSource(hf_endpoint=...)``). Routes:

* ``GET /api/models/{owner}/{name}[/revision/{rev}]`` → model info: ``id``, ``sha`` (the
  commit the revision resolves to), ``siblings`` (with ``?blobs=true``: ``size``,
  ``blobId`` and ``lfs`` {``sha256``, ``size``, ``pointerSize``});
* ``GET /api/models/{owner}/{name}/tree/{rev}[/{path}]`` → the listing
  ``list_repo_tree`` (and so ``snapshot_download``) reads: files (``type``, ``path``,
  ``size``, ``oid``, ``lfs`` {``oid``, ``size``, ``pointerSize``}) and folders, the
  folder's direct children or, with ``?recursive=true``, everything below it; paged by
  ``?cursor=`` with a ``Link: <...>; rel="next"`` header, as the Hub pages
  (``HubState.tree_page_size`` entries a page);
* ``HEAD|GET /{owner}/{name}/resolve/{rev}/{path}`` → for files kept in git: the bytes
  (``Range`` → 206) with ``ETag`` = git blob sha1 and ``X-Repo-Commit``; for LFS files a
  302 to the CDN with ``X-Linked-Etag`` (the sha256), ``X-Linked-Size``,
  ``X-Repo-Commit`` — exactly the headers ``hf_hub_download`` reads;
* ``HEAD|GET /cdn/{sha256}`` on a *second port* (another origin, like the real CDN, so
  clients must drop the ``Authorization`` header there), with ``Range``.

Private repositories need ``Authorization: Bearer <token>`` (401 otherwise). Every body
byte served from ``resolve``/``cdn`` is counted per blob, so tests can show that a second
repository sharing files fetched 0 bytes of them from the origin. Faults are injected on
download routes: N responses with a status (and ``Retry-After``), N connections dropped
after K bytes, or down for good.

Runs in a background thread for tests (:class:`HubFixture`) or as a process for the bench
(``python tests/mirror/fixtures_hf.py --repo owner/name=DIR``), announcing
``BDN_LISTENING <url>`` like every bdn service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".h5", ".msgpack")
LFS_MIN_BYTES = 10 * 1024
STREAM_BLOCK = 256 * 1024
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()


@dataclass
class Blob:
    path: Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool


@dataclass
class Repo:
    repo_id: str
    token: str | None = None
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)


@dataclass
class Faults:
    fail_next: int = 0
    fail_status: int = 500
    retry_after: str | None = None
    drop_next: int = 0
    drop_after_bytes: int = 0
    down: bool = False
    # Blobs (sha256) answered with 503 + Retry-After: 30 — a download that stays stuck
    # in backoff until the test lets it go.
    stall_blobs: set[str] = field(default_factory=set)
    # Responses that send headers and then nothing for 30 s (a hung origin).
    hang_next: int = 0


class HubState:
    """Repositories, blobs and counters. Mutated from tests while the server runs."""

    def __init__(self, blob_dir: Path) -> None:
        self.blob_dir = blob_dir
        blob_dir.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.lock = threading.Lock()
        self.bytes_by_blob: Counter[str] = Counter()
        self.ranges: list[tuple[str, str | None]] = []
        self.cdn_auth_headers = 0
        # Every Authorization header either server received, so a test can prove that a
        # credential never reached the upstream.
        self.auth_headers_seen: list[str] = []
        self.download_requests = 0
        # Download responses being served now, and the most at once (for limit tests).
        self.inflight = 0
        self.max_inflight = 0
        # Cap on each response's rate (bytes/s), as S3 and CDNs cap one connection;
        # None = as fast as this process can send.
        self.conn_bytes_per_s: float | None = None
        # Entries per page of a tree listing (the Hub's is 1000).
        self.tree_page_size = 1000

    # -- setup ---------------------------------------------------------------------

    def add_blob(self, data: bytes, *, lfs: bool) -> Blob:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_dir / sha
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return Blob(path, len(data), sha, git_blob_sha1(data), lfs)

    def add_blob_file(self, src: Path, *, lfs: bool) -> Blob:
        h256 = hashlib.sha256()
        h1 = hashlib.sha1(f"blob {src.stat().st_size}\0".encode(), usedforsecurity=False)
        with open(src, "rb") as f:
            while block := f.read(8 << 20):
                h256.update(block)
                h1.update(block)
        sha = h256.hexdigest()
        path = self.blob_dir / sha
        if not path.exists():
            os.link(src, path) if src.stat().st_dev == self.blob_dir.stat().st_dev \
                else path.write_bytes(src.read_bytes())
        return Blob(path, src.stat().st_size, sha, h1.hexdigest(), lfs)

    @staticmethod
    def is_lfs(path: str, size: int) -> bool:
        return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
               token: str | None = None, replace: bool = False) -> str:
        """Commit ``files`` on ``branch`` (added to the branch's tree unless ``replace``);
        returns the new commit sha."""
        blobs = {p: self.add_blob(d, lfs=self.is_lfs(p, len(d))) for p, d in files.items()}
        return self._commit_blobs(repo_id, blobs, branch=branch, token=token, replace=replace)

    def commit_dir(self, repo_id: str, root: Path, *, branch: str = "main") -> str:
        blobs = {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                blobs[rel] = self.add_blob_file(p, lfs=self.is_lfs(rel, p.stat().st_size))
        return self._commit_blobs(repo_id, blobs, branch=branch, token=None, replace=True)

    def _commit_blobs(self, repo_id: str, blobs: dict[str, Blob], *, branch: str,
                      token: str | None, replace: bool) -> str:
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            if token is not None:
                repo.token = token
            parent = repo.branches.get(branch)
            tree = {} if replace or parent is None else dict(repo.commits[parent])
            tree.update(blobs)
            doc = json.dumps([parent, sorted((p, b.git_sha1) for p, b in tree.items())])
            sha = hashlib.sha1(doc.encode(), usedforsecurity=False).hexdigest()
            repo.commits[sha] = tree
            repo.branches[branch] = sha
            return sha

    def tag(self, repo_id: str, tag: str, commit: str) -> None:
        with self.lock:
            self.repos[repo_id].tags[tag] = commit

    def reset_counters(self) -> None:
        with self.lock:
            self.bytes_by_blob.clear()
            self.ranges.clear()
            self.cdn_auth_headers = 0
            self.download_requests = 0
            self.max_inflight = 0

    @property
    def bytes_served(self) -> int:
        with self.lock:
            return sum(self.bytes_by_blob.values())

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"bytes_served": sum(self.bytes_by_blob.values()),
                    "bytes_by_blob": dict(self.bytes_by_blob),
                    "download_requests": self.download_requests,
                    "cdn_auth_headers": self.cdn_auth_headers}


def _resolve_rev(repo: Repo, rev: str) -> str | None:
    if rev in repo.branches:
        return repo.branches[rev]
    if rev in repo.tags:
        return repo.tags[rev]
    return rev if rev in repo.commits else None


def _error(status: int, code: str | None = None, message: str | None = None,
           extra: dict[str, str] | None = None) -> web.Response:
    headers = dict(extra or {})
    if code:
        headers["X-Error-Code"] = code
    if message:
        headers["X-Error-Message"] = message
    return web.json_response({"error": message or code or "error"}, status=status,
                             headers=headers)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    if not header:
        return None
    m = _RANGE_RE.match(header.strip())
    if not m:
        return None
    a, b = m.groups()
    if a == "":
        n = int(b)
        return max(0, size - n), size
    start = int(a)
    end = min(int(b) + 1, size) if b else size
    return start, end


class HubApp:
    def __init__(self, state: HubState) -> None:
        self.state = state
        self.cdn_url = ""
        self.stopping = asyncio.Event()

    def _auth(self, request: web.Request, repo: Repo) -> web.Response | None:
        if repo.token is None:
            return None
        got = request.headers.get("Authorization", "")
        if got != f"Bearer {repo.token}":
            # The real Hub answers 401 RepoNotFound for private repos without valid auth.
            return _error(401, "RepoNotFound", "Invalid credentials in Authorization header")
        return None

    def _repo(self, request: web.Request) -> Repo | web.Response:
        repo_id = f"{request.match_info['owner']}/{request.match_info['name']}"
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return _error(401, "RepoNotFound", "Repository not found")
        return self._auth(request, repo) or repo

    async def model_info(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        if isinstance(repo, web.Response):
            return repo
        rev = request.match_info.get("rev", "main")
        sha = _resolve_rev(repo, rev)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, b in sorted(repo.commits[sha].items()):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s["size"] = b.size
                s["blobId"] = b.git_sha1
                if b.lfs:
                    s["lfs"] = {"sha256": b.sha256, "size": b.size, "pointerSize": 134}
            siblings.append(s)
        return web.json_response({"_id": repo.repo_id, "id": repo.repo_id,
                                  "modelId": repo.repo_id, "sha": sha,
                                  "private": repo.token is not None, "gated": False,
                                  "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                                  "siblings": siblings})

    async def tree(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        if isinstance(repo, web.Response):
            return repo
        rev = request.match_info["rev"]
        sha = _resolve_rev(repo, rev)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        base = request.match_info.get("path", "").strip("/")
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{base}/" if base else ""
        files = {p: b for p, b in repo.commits[sha].items() if p.startswith(prefix)}
        if base and not files:
            return _error(404, "EntryNotFound", f"{base} does not exist at {sha}")
        entries: dict[str, dict[str, Any]] = {}
        for path, b in sorted(files.items()):
            rest = path[len(prefix):].split("/")
            # Folders on the way to the file (only the first level unless recursive).
            for depth in range(1, len(rest)):
                folder = prefix + "/".join(rest[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                            "oid": hashlib.sha1(folder.encode(),
                                                                usedforsecurity=False
                                                                ).hexdigest()})
                if not recursive:
                    break
            if recursive or len(rest) == 1:
                e: dict[str, Any] = {"type": "file", "path": path, "size": b.size,
                                     "oid": b.git_sha1}
                if b.lfs:
                    e["lfs"] = {"oid": b.sha256, "size": b.size, "pointerSize": 134}
                entries[path] = e
        listing = [entries[k] for k in sorted(entries)]
        start = int(request.query.get("cursor", "0") or 0)
        page = listing[start:start + self.state.tree_page_size]
        headers = {}
        if start + len(page) < len(listing):
            nxt = request.url.update_query(cursor=str(start + len(page)))
            headers["Link"] = f'<{nxt}>; rel="next"'
        return web.json_response(page, headers=headers)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        if isinstance(repo, web.Response):
            return repo
        rev = request.match_info["rev"]
        sha = _resolve_rev(repo, rev)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        path = request.match_info["path"]
        blob = repo.commits[sha].get(path)
        if blob is None:
            return _error(404, "EntryNotFound", f"{path} does not exist at {sha}",
                          {"X-Repo-Commit": sha})
        if blob.lfs:
            headers = {"X-Repo-Commit": sha, "X-Linked-Etag": f'"{blob.sha256}"',
                       "X-Linked-Size": str(blob.size), "ETag": f'"{blob.git_sha1}"',
                       "Location": f"{self.cdn_url}/cdn/{blob.sha256}?sig=fixture"}
            return web.Response(status=302, headers=headers)
        return await self._serve(request, blob, {"X-Repo-Commit": sha,
                                                 "ETag": f'"{blob.git_sha1}"'})

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        sha = request.match_info["sha"]
        if "Authorization" in request.headers:
            with self.state.lock:
                self.state.cdn_auth_headers += 1
        path = self.state.blob_dir / sha
        if not re.fullmatch(r"[0-9a-f]{64}", sha) or not path.exists():
            return _error(404, "EntryNotFound")
        size = path.stat().st_size
        blob = Blob(path, size, sha, "", True)
        return await self._serve(request, blob, {"ETag": f'"{sha}"'})

    async def _serve(self, request: web.Request, blob: Blob,
                     headers: dict[str, str]) -> web.StreamResponse:
        st = self.state
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers,
                                                     "Content-Length": str(blob.size),
                                                     "Accept-Ranges": "bytes"})
        drop_after: int | None = None
        hang = False
        with st.lock:
            st.download_requests += 1
            st.ranges.append((blob.sha256, request.headers.get("Range")))
            f = st.faults
            if f.down:
                return _error(503, message="origin is down")
            if blob.sha256 in f.stall_blobs:
                return _error(503, message="stalled", extra={"Retry-After": "30"})
            if f.fail_next > 0:
                f.fail_next -= 1
                extra = {"Retry-After": f.retry_after} if f.retry_after else {}
                return _error(f.fail_status, message="injected failure", extra=extra)
            if f.drop_next > 0:
                f.drop_next -= 1
                drop_after = f.drop_after_bytes
            if f.hang_next > 0:
                f.hang_next -= 1
                hang = True
        rng = _parse_range(request.headers.get("Range"), blob.size)
        start, end = rng if rng else (0, blob.size)
        if start >= blob.size and blob.size > 0:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{blob.size}"})
        resp = web.StreamResponse(status=206 if rng else 200, headers=headers)
        resp.content_length = end - start
        resp.headers["Accept-Ranges"] = "bytes"
        if rng:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        await resp.prepare(request)
        if hang:
            # The client's read timeout must fire long before; stop() ends the wait.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 30)
            return resp
        rate = st.conn_bytes_per_s
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with st.lock:
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
        done = [False]

        def release() -> None:
            # Called before the last block goes out: once the client has every byte it
            # may send its next request, which must not count this one as in flight.
            if not done[0]:
                done[0] = True
                with st.lock:
                    st.inflight -= 1

        try:
            await self._stream(request, resp, blob, start, end, rate, loop, t0, drop_after,
                               release)
        finally:
            release()
        return resp

    async def _stream(self, request: web.Request, resp: web.StreamResponse, blob: Blob,
                      start: int, end: int, rate: float | None,
                      loop: asyncio.AbstractEventLoop, t0: float,
                      drop_after: int | None, release: Callable[[], None]) -> None:
        st = self.state
        pos = start
        with open(blob.path, "rb") as fh:
            while pos < end:
                n = min(STREAM_BLOCK, end - pos)
                if rate:  # simulated per-connection bandwidth, not synchronisation
                    ahead = (pos + n - start) / rate - (loop.time() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                if drop_after is not None:
                    n = min(n, start + drop_after - pos)
                    if n <= 0:
                        # Simulate a dropped connection mid-body.
                        release()
                        assert request.transport is not None
                        request.transport.close()
                        return
                data = os.pread(fh.fileno(), n, pos)
                if pos + len(data) >= end:
                    release()
                await resp.write(data)
                with st.lock:
                    st.bytes_by_blob[blob.sha256] += len(data)
                pos += len(data)
        await resp.write_eof()

    async def fixture_stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.state.stats())

    @web.middleware
    async def _record_auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if "Authorization" in request.headers:
            with self.state.lock:
                self.state.auth_headers_seen.append(request.headers["Authorization"])
        return await handler(request)  # type: ignore[no-any-return]

    def hub_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record_auth])
        app.router.add_get("/api/models/{owner}/{name}", self.model_info)
        app.router.add_get("/api/models/{owner}/{name}/revision/{rev:.+}", self.model_info)
        app.router.add_get("/api/models/{owner}/{name}/tree/{rev}", self.tree)
        app.router.add_get("/api/models/{owner}/{name}/tree/{rev}/{path:.+}", self.tree)
        app.router.add_route("*", "/{owner}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        app.router.add_get("/_fixture/stats", self.fixture_stats)
        return app

    def cdn_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record_auth])
        app.router.add_route("*", "/cdn/{sha}", self.cdn)
        return app


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


class HubFixture:
    """The Hub and its CDN on two loopback ports, served from a background thread."""

    def __init__(self, blob_dir: Path) -> None:
        self.state = HubState(blob_dir)
        self.app = HubApp(self.state)
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runners: list[web.AppRunner] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="hub-fixture")

    def start(self) -> HubFixture:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(30)
        return self

    async def _start(self) -> None:
        cdn_runner, cdn_url = await _start(self.app.cdn_app())
        self.app.cdn_url = cdn_url
        hub_runner, self.url = await _start(self.app.hub_app())
        self._runners = [hub_runner, cdn_runner]

    def stop(self) -> None:
        async def stop() -> None:
            self.app.stopping.set()
            for r in self._runners:
                await r.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Hugging Face Hub fixture server")
    p.add_argument("--blob-dir", required=True)
    p.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=DIR",
                   help="serve DIR's files as a repository (repeatable)")
    p.add_argument("--conn-mbps", type=float, default=0.0,
                   help="cap each response at this many MB/s (0: no cap)")
    args = p.parse_args(argv)
    state = HubState(Path(args.blob_dir))
    state.conn_bytes_per_s = args.conn_mbps * 1e6 if args.conn_mbps else None
    for spec in args.repo:
        repo_id, _, root = spec.partition("=")
        state.commit_dir(repo_id, Path(root))
    app = HubApp(state)

    async def run() -> None:
        cdn_runner, app.cdn_url = await _start(app.cdn_app())
        hub_runner, url = await _start(app.hub_app())
        print(f"BDN_LISTENING {url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await hub_runner.cleanup()
        await cdn_runner.cleanup()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
