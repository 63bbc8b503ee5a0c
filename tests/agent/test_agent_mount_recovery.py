"""A mount after a kill between a cross-device copy being named and its inode being
recorded: the ledger still holds the write-ahead entry (the node-cache file's inode),
the mount holds a complete copy with another inode. The next pull must adopt that copy
— the same bytes — and must still refuse a file with other bytes (not bdn's).

Pure file-system calls in a temporary folder; the copy is made by hand where a killed
agent's ``copy_across`` would have named it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.errors import MountError
from agent.mounts import MountLedger, _ident, check_mount_paths, link_file, seal


def _state(tmp_path: Path, content: bytes) -> tuple[Path, Path, MountLedger]:
    src = tmp_path / "cache" / "files" / "config.json"
    src.parent.mkdir(parents=True)
    src.write_bytes(b'{"hidden_size": 384}')
    mount = tmp_path / "mnt"
    mount.mkdir()
    target = mount / "config.json"
    target.write_bytes(content)  # what copy_across named before the kill
    ledger = MountLedger(str(mount))
    ledger.files["config.json"] = _ident(src.stat())  # the write-ahead entry
    return src, mount, ledger


def test_a_copy_named_before_a_kill_is_adopted_by_the_next_pull(tmp_path: Path) -> None:
    src, mount, ledger = _state(tmp_path, b'{"hidden_size": 384}')
    saved: list[dict[str, tuple[int, int]]] = []
    check_mount_paths(str(mount), ["config.json"], ledger=ledger,
                      expected={"config.json": src})  # failed before: "not placed by bdn"
    target = link_file(mount, "config.json", src, ledger,
                       lambda led: saved.append(dict(led.files)))
    assert target.read_bytes() == src.read_bytes()
    assert ledger.files["config.json"] == _ident(target.stat())  # the copy's inode now
    assert saved, "the adopted inode was saved"


def test_a_file_with_other_bytes_is_still_refused(tmp_path: Path) -> None:
    src, mount, ledger = _state(tmp_path, b'{"hidden_size": 999}')
    with pytest.raises(MountError, match="not placed by bdn"):
        check_mount_paths(str(mount), ["config.json"], ledger=ledger,
                          expected={"config.json": src})
    ledger.files.clear()  # no write-ahead entry: a same-bytes file is not ours either
    shutil.copyfile(src, mount / "config.json")
    with pytest.raises(MountError, match="not placed by bdn"):
        check_mount_paths(str(mount), ["config.json"], ledger=ledger,
                          expected={"config.json": src})


def test_a_folder_made_before_a_kill_is_adopted_and_sealed(tmp_path: Path) -> None:
    """Killed between ``mkdir`` of a file's folder and recording it: the write-ahead
    entry says the agent was making it, so the next pull adopts and seals it. Before,
    it stayed 0755 as if a user had made it (1 in ~40 runs of the kill -9 test)."""
    src = tmp_path / "cache" / "files" / "w.bin"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"weights")
    mount = tmp_path / "mnt"
    saved: list[MountLedger] = []
    ledger = MountLedger(str(mount))
    link_file(mount, "a.bin", src, ledger, saved.append)  # the mount root is ours
    # The state a kill leaves: "nested" and "nested/deeper" written ahead, made, and
    # not recorded; "gone" written ahead and never made.
    ledger.pending |= {"nested", "nested/deeper", "gone"}
    (mount / "nested" / "deeper").mkdir(parents=True)
    doc = MountLedger.from_doc(str(mount), ledger.to_doc())  # as the next start reads it
    assert doc.pending == {"nested", "nested/deeper", "gone"}
    link_file(mount, "nested/deeper/b.bin", src, doc, saved.append)
    assert not doc.pending and "gone" not in doc.dirs
    assert {"nested", "nested/deeper"} <= set(doc.dirs)
    seal(mount, doc)
    for d in (mount, mount / "nested", mount / "nested" / "deeper"):
        assert d.stat().st_mode & 0o222 == 0, f"{d} is writable"


def test_a_users_folder_is_never_adopted(tmp_path: Path) -> None:
    """A folder that was there before the agent wrote anything ahead stays the user's."""
    src = tmp_path / "cache" / "files" / "w.bin"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"weights")
    mount = tmp_path / "mnt"
    (mount / "mine").mkdir(parents=True)
    ledger = MountLedger(str(mount))
    link_file(mount, "mine/b.bin", src, ledger, lambda led: None)
    assert "mine" not in ledger.dirs and not ledger.pending
    seal(mount, ledger)
    assert (mount / "mine").stat().st_mode & 0o200, "the user's folder was sealed"
