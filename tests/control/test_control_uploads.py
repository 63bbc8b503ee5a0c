"""Pushed files kept under ``STATE/uploads`` (``control/push.py``) do not pile up: an
upload no push has named for ``UPLOAD_KEEP_S`` goes at the next sweep (the next push
uploads it again), one a push just named stays whatever its age, and nothing that bdn
did not write there is touched. A fake clock stands for the weeks."""

from __future__ import annotations

import time
from pathlib import Path

import blake3

from bdn.store import BlobStore
from control.push import STALE_S, UPLOAD_KEEP_S, PushedFile, Pushes
from manifests.digest import Digest


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _upload(pushes: Pushes, data: bytes) -> str:
    digest = blake3.blake3(data).hexdigest()
    tmp, final = pushes.upload_target(digest)
    tmp.write_bytes(data)
    pushes.finish_upload(tmp, final, digest, digest)
    return digest


def test_uploads_no_push_named_for_a_week_are_removed(tmp_path: Path) -> None:
    clock = Clock()
    pushes = Pushes(tmp_path / "state", BlobStore(str(tmp_path / "store")), clock=clock)
    old = _upload(pushes, b"print('v1')\n")
    kept = _upload(pushes, b"print('v2')\n")
    theirs = pushes.uploads / "notes.txt"  # not a digest: never bdn's to remove
    theirs.write_text("mine")
    clock.now += UPLOAD_KEEP_S + 10
    # A push names v2 (bdn push asks which contents are missing first): it stays.
    assert pushes.missing([kept, old]) == []
    clock.now += STALE_S / 2
    pushes.sweep()
    assert (pushes.uploads / kept).is_file()
    assert (pushes.uploads / old).is_file()  # named in that same ask
    # A week later nobody named either: both go, and the next push lacks them again.
    clock.now += UPLOAD_KEEP_S + 10
    pushes.sweep()
    assert pushes.missing([kept, old]) == sorted([kept, old])
    assert theirs.read_text() == "mine"


def test_a_fresh_upload_is_kept(tmp_path: Path) -> None:
    clock = Clock()
    pushes = Pushes(tmp_path / "state", BlobStore(str(tmp_path / "store")), clock=clock)
    digest = _upload(pushes, b"x = 1\n")
    clock.now += UPLOAD_KEEP_S - 60
    pushes.sweep()
    assert pushes.missing([digest]) == []


def test_an_executable_pushed_file_stays_executable_in_the_code_manifest(
        tmp_path: Path) -> None:
    """A Truss folder may ship a script its model runs: ``bdn push`` sends the bit, and
    the code manifest (hence every replica's copy) keeps it; other files do not gain it."""
    store = BlobStore(str(tmp_path / "store"))
    pushes = Pushes(tmp_path / "state", store)
    config = _upload(pushes, b"model_name: tiny\n")
    script = _upload(pushes, b"#!/bin/sh\necho hi\n")
    model = _upload(pushes, b"class Model: pass\n")
    record = pushes.push([PushedFile("config.yaml", config),
                          PushedFile("data/run.sh", script, executable=True),
                          PushedFile("model/model.py", model)])
    manifest = store.get_manifest(Digest.parse(record.code))
    modes = {f.path: f.mode for f in manifest.files}
    assert modes["data/run.sh"] & 0o111 == 0o111
    assert modes["model/model.py"] & 0o111 == 0
    # The upload itself is shared by every push that names it: never made executable.
    assert (pushes.uploads / script).stat().st_mode & 0o111 == 0
