"""Which peers to pass over for a while: a pure policy over failures and an explicit now.

A peer that timed out (connect timeout, first-byte deadline, stall) or failed at the
transport is *suspected*: every caller moves it behind the trusted peers for
``suspect_s``, doubling with each consecutive failure up to ``max_suspect_s``. Then it is
*half-open*: the first caller that orders its sources gets to *probe* it (keeps it in
place) while every other caller still passes it over; an answer from it (any answer
that came back, even a 404 or bad bytes — it is not hung) trusts it again, another
failure suspects it for longer. A probe that never reports back (its request was
abandoned) is forgotten after ``suspect_s`` so the peer can be probed again.

Suspected peers are moved to the end, never dropped: when every peer is suspected a
request still goes out, so suspicion alone never fails a pull.

Two ways to probe. The ring client's manifest and ref reads probe *in line*: the
caller that :meth:`Suspicion.order` hands the probe sends its real request there first.
The agent's chunk fetcher must not: a probe of a still-hung pod would cost that chunk a
first-byte deadline, on the pull's critical path. It orders with ``inline_probe=False``
(half-open peers stay behind) and probes *beside* the pulls — :meth:`take_probe` hands
the probe out, the fetcher asks the peer's ``/healthz`` on its own thread and reports
:meth:`answered` or :meth:`failed`.

Shared by the agent's chunk fetcher and the ring client's manifest and ref reads (one
instance per agent), so a pod that hung on a manifest is not asked for chunks either.
No clock is read here: every method takes ``now_s`` (tests use a fake clock).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

# A suspected peer is passed over this long after its first failure, doubling while its
# probes fail, up to the cap: short enough that a pod back from a pause is used again
# within a pull, long enough that a hung one costs few deadlines.
DEFAULT_SUSPECT_S = 5.0
MAX_SUSPECT_S = 60.0

TRUSTED = "trusted"
SUSPECTED = "suspected"
HALF_OPEN = "half-open"


@dataclass
class _PeerRecord:
    failures: int = 0                    # consecutive failures
    until_s: float = 0.0                 # suspected before this time
    probe_since_s: float | None = None   # a half-open probe was handed out then


class Suspicion:
    """Peers under suspicion (see module docstring). Thread-safe."""

    def __init__(self, suspect_s: float = DEFAULT_SUSPECT_S,
                 max_suspect_s: float = MAX_SUSPECT_S) -> None:
        if not 0 <= suspect_s <= max_suspect_s:
            raise ValueError(f"Suspicion: need 0 ≤ suspect_s ({suspect_s}) ≤ "
                             f"max_suspect_s ({max_suspect_s})")
        self.suspect_s = suspect_s
        self.max_suspect_s = max_suspect_s
        self._peers: dict[str, _PeerRecord] = {}
        self._lock = threading.Lock()

    def state(self, peer: str, now_s: float) -> str:
        with self._lock:
            return self._state(peer, now_s)

    def _state(self, peer: str, now_s: float) -> str:
        rec = self._peers.get(peer)
        if rec is None:
            return TRUSTED
        return SUSPECTED if now_s < rec.until_s else HALF_OPEN

    def failed(self, peer: str, now_s: float) -> None:
        """``peer`` timed out or failed: suspect it, for twice as long as last time.
        Failures of requests sent before it was suspected (a dozen threads' requests
        to one hung pod end together) are the same failure: while suspected, another
        one changes nothing; only a failed probe (or the first failure) doubles it."""
        with self._lock:
            rec = self._peers.setdefault(peer, _PeerRecord())
            if rec.failures and now_s < rec.until_s:
                return
            rec.failures += 1
            rec.probe_since_s = None
            rec.until_s = now_s + min(self.max_suspect_s,
                                      self.suspect_s * 2 ** min(rec.failures - 1, 16))

    def answered(self, peer: str) -> None:
        """``peer`` answered (whatever it said): it is not hung, trust it again."""
        with self._lock:
            self._peers.pop(peer, None)

    def order(self, sources: Sequence[str], now_s: float, *,
              inline_probe: bool = True) -> list[str]:
        """``sources`` with the suspected peers moved to the end, in their order. A
        half-open peer that would be asked first (no trusted source before it) is the
        probe: it keeps its place for this caller only — unless ``inline_probe`` is
        False, when every half-open peer stays behind (probe it with
        :meth:`take_probe`)."""
        with self._lock:
            first: list[str] = []
            behind: list[str] = []
            for s in sources:
                state = self._state(s, now_s)
                if state == TRUSTED or (inline_probe and state == HALF_OPEN and not first
                                        and self._take_probe(s, now_s)):
                    first.append(s)
                else:
                    behind.append(s)
            return first + behind

    def take_probe(self, peer: str, now_s: float) -> bool:
        """Whether the caller should probe ``peer`` now: it is half-open and no probe
        was handed out within the last ``suspect_s``. The caller reports the probe's
        outcome with :meth:`answered` or :meth:`failed`."""
        with self._lock:
            return self._state(peer, now_s) == HALF_OPEN and self._take_probe(peer, now_s)

    def _take_probe(self, peer: str, now_s: float) -> bool:
        rec = self._peers[peer]
        if rec.probe_since_s is not None and now_s - rec.probe_since_s < self.suspect_s:
            return False
        rec.probe_since_s = now_s
        return True


__all__ = ["DEFAULT_SUSPECT_S", "HALF_OPEN", "MAX_SUSPECT_S", "SUSPECTED", "TRUSTED",
           "Suspicion"]
