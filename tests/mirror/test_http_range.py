"""bdn.transfer.http_range against real servers on loopback: the Hub fixture (its resolve
route redirects LFS files to a CDN on another port; faults injected on both) and Python's
own ``http.server`` (HTTP/1.0, which ignores ``Range``)."""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bdn.errors import AuthError, SourceError
from bdn.retry import RetryableError, RetryPolicy
from bdn.transfer.files import FetchCounters, SourceFile
from bdn.transfer.http_range import RangeClient, status_error
from bdn.transfer.options import DownloadOptions
from bdn.transfer.ranged import fetch_resumable
from tests.support.procs import ServiceProcess, free_port, wait_http

DATA = bytes((i * 131 + i // 4099) % 256 for i in range(3_000_000))
SHA = hashlib.sha256(DATA).hexdigest()
FAST = RetryPolicy(attempts=4, base_delay_s=0.0, max_delay_s=0.0)
TOKEN = "hf_secret_token_value"


def _refuse(status: int, headers: Any, body: str) -> BaseException:
    return status_error(status, headers, body, uri="t://src", path="w.bin", service="Hub")


@pytest.fixture
def client() -> Iterator[RangeClient]:
    c = RangeClient(DownloadOptions(read_timeout_s=0.5, retry=FAST), user_agent="bdn-test")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cdn(hub: Any) -> str:
    hub.state.add_blob(DATA, lfs=True)
    return f"{hub.app.cdn_url}/cdn/{SHA}"


def _get(client: RangeClient, url: str, start: int, end: int, **kw: Any) -> bytes:
    return b"".join(client.fetcher(url, refuse=_refuse, **kw)(start, end))


def test_ranges_equal_slices_over_one_kept_alive_connection(client: RangeClient,
                                                            cdn: str, hub: Any) -> None:
    cases = [(0, len(DATA)), (0, 1), (len(DATA) - 1, len(DATA)), (1_000_000, 1_000_001),
             (123_457, 2_345_679)]
    for start, end in cases:
        assert _get(client, cdn, start, end, block_bytes=256 * 1024) == DATA[start:end]
    assert [r for _, r in hub.state.ranges] == [f"bytes={s}-{e - 1}" for s, e in cases]
    # Each response was read to its end, so one connection carried them all.
    assert [len(c) for c in client._idle.values()] == [1]


def test_redirect_is_followed_without_the_credentials(client: RangeClient, hub: Any) -> None:
    sha = hub.state.commit("org/private", {"w.safetensors": DATA}, token=TOKEN)
    url = f"{hub.url}/org/private/resolve/{sha}/w.safetensors"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _get(client, url, 10, 20_010, headers=lambda: auth) == DATA[10:20_010]
    assert hub.state.cdn_auth_headers == 0  # the token stayed with the Hub
    with pytest.raises(AuthError) as e:
        _get(client, url, 0, 10)  # no token: refused by the Hub
    assert e.value.status == 401 and TOKEN not in str(e.value)


def test_statuses_map_to_final_and_retryable_errors(client: RangeClient, cdn: str,
                                                    hub: Any) -> None:
    hub.state.faults.fail_next, hub.state.faults.fail_status = 1, 503
    hub.state.faults.retry_after = "7"
    with pytest.raises(RetryableError) as r:
        _get(client, cdn, 0, 10)
    assert r.value.status == 503 and r.value.retry_after_s == 7.0
    with pytest.raises(SourceError, match=r"w\.bin.*not found") as nf:
        _get(client, f"{hub.app.cdn_url}/cdn/{'0' * 64}", 0, 10)
    assert nf.value.status == 404
    hub.state.faults.fail_next, hub.state.faults.fail_status = 1, 400
    with pytest.raises(SourceError, match="unexpected HTTP 400"):
        _get(client, cdn, 0, 10)
    assert _get(client, cdn, 0, 10) == DATA[:10]  # and the next request is fine


def test_dropped_connection_resumes_at_the_first_missing_byte(client: RangeClient,
                                                              cdn: str, hub: Any) -> None:
    hub.state.faults.drop_next, hub.state.faults.drop_after_bytes = 1, 700_000
    got = bytearray()
    fetch_resumable(client.fetcher(cdn, refuse=_refuse), 0, len(DATA),
                    lambda off, block: got.extend(block), source_uri="t://src",
                    file=SourceFile("w.bin", len(DATA)), options=client.options,
                    counters=FetchCounters(), counter_lock=threading.Lock())
    assert bytes(got) == DATA
    first, second = [r for _, r in hub.state.ranges]
    assert first == f"bytes=0-{len(DATA) - 1}"
    resumed_at = int(second.split("=")[1].split("-")[0])
    assert 0 < resumed_at <= 700_000  # only what had not arrived was asked again


def test_a_hung_response_fails_on_the_read_timeout(client: RangeClient, cdn: str,
                                                   hub: Any) -> None:
    hub.state.faults.hang_next = 1
    with pytest.raises(RetryableError, match=r"TimeoutError|timed out"):
        _get(client, cdn, 0, 1000)
    assert _get(client, cdn, 0, 1000) == DATA[:1000]


def test_a_pooled_connection_closed_meanwhile_is_replaced(client: RangeClient, cdn: str,
                                                          hub: Any) -> None:
    assert _get(client, cdn, 0, 100) == DATA[:100]
    (idle,) = client._idle.values()
    idle[0].sock.close()  # as if the server had dropped it while it sat in the pool
    idle[0].sock = _Dead()
    assert _get(client, cdn, 100, 200) == DATA[100:200]
    assert hub.state.download_requests == 2


class _Dead:
    """A socket whose peer is gone: sending fails as on a reset connection."""

    def sendall(self, _data: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def close(self) -> None:
        pass


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "w.bin").write_bytes(DATA)
    port = free_port()
    proc = ServiceProcess([sys.executable, "-m", "http.server", str(port), "--bind",
                           "127.0.0.1", "--directory", str(tmp_path / "www")],
                          ready_prefix=None)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/", proc=proc)
        yield url + "/w.bin"
    finally:
        proc.stop()


def test_an_origin_that_ignores_range_has_the_prefix_dropped(client: RangeClient,
                                                             plain_server: str) -> None:
    # http.server answers 200 with the whole file to a ranged GET.
    assert _get(client, plain_server, 2_000_000, 2_000_100) == DATA[2_000_000:2_000_100]
    assert _get(client, plain_server, 0, 5) == DATA[:5]
    # Those responses were not read to their end: nothing was kept for reuse.
    assert not any(client._idle.values())
