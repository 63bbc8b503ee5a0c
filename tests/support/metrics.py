"""Reading a service's ``/metrics`` in tests by name and labels, not by text layout.

The exposition is written by prometheus_client (:mod:`bdn.metrics`), which orders a
sample's labels by name, so a test that looks for a substring such as
``deployment_id="d",code="429"`` would test the writer's layout rather than the value.
These helpers parse with the library's own parser and match a subset of labels.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name`` whose labels include ``labels``."""
    return [(dict(s.labels), float(s.value))
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(text: str, name: str, **labels: str) -> float | None:
    """The one sample ``name`` with ``labels`` (None if there is none; an error if several
    match, since the test then does not say which it means)."""
    found = samples(text, name, **labels)
    assert len(found) <= 1, f"{len(found)} samples of {name} match {labels}: {found}"
    return found[0][1] if found else None
