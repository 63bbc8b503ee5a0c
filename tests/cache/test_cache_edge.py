"""The cache's HTTP edge, bounded: every validator anchored to the whole string,
conditional requests, negative caching, bounded prefetch bodies, rate-limited verify,
and connection timeouts (a soak of half-open connections beside normal clients).

Every behaviour is checked against a running ``bdn cache-server`` process over raw
loopback sockets; the pure parts (validators, the negative cache policy) directly.
"""

from __future__ import annotations

import os

import pytest

from bdn.config import parse_auth
from bdn.errors import ConfigError
from bdn.store import BlobStore
from cache.cli import parse_bytes
from control.errors import RequestError
from control.store import check_name
from manifests.digest import Digest
from manifests.errors import DigestError, RefError
from manifests.refs import Ref
from tests.cache.conftest import StartCache, post_json
from tests.cache.test_cache_fastpath import RawConnection

# -- item 7: validators match the whole string ----------------------------------------

HEX = "ab" * 32


def test_digest_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(DigestError):
        Digest.parse(f"b3:{HEX}\n")


@pytest.mark.parametrize("part", ["namespace", "model", "tag"])
def test_ref_part_with_a_trailing_newline_is_refused(part: str) -> None:
    parts = {"namespace": "ns", "model": "m", "tag": "t"}
    parts[part] += "\n"
    with pytest.raises(RefError):
        Ref(**parts)


def test_control_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(RequestError):
        check_name("model\n", "name")


def test_secret_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError):
        parse_auth({"auth_secret_name": "hf-token\n"}, 0)


def test_byte_size_with_a_trailing_newline_still_parses_as_spaces_do() -> None:
    # \s* around the number already allowed whitespace: unchanged, now explicit.
    assert parse_bytes("10M\n") == parse_bytes(" 10M ") == 10 << 20


def test_trailing_newline_is_400_at_the_cache_and_writes_no_ref(
        store: BlobStore, start_cache: StartCache) -> None:
    cache = start_cache(store.url)
    conn = RawConnection(cache.url)
    try:
        for target in (f"/v1/objects/b3:{HEX}%0A", f"/v1/manifests/b3:{HEX}%0A",
                       "/v1/refs/ns/model/tag%0A", "/v1/refs/ns%0A/model/tag"):
            assert conn.request(target)[0] == 400, target
        status, body = post_json(f"{cache.url}/v1/prefetch", {"ref": "ns/model:tag\n"})
        assert status == 400, body
        status, body = post_json(f"{cache.url}/v1/objects/b3:{HEX}%0A/verify")
        assert status == 400, body
    finally:
        conn.close()
    refs = os.path.join(store.url.removeprefix("file://"), "refs")
    assert not os.path.exists(refs) or not any(
        "\n" in name for _, dirs, files in os.walk(refs) for name in dirs + files)
