"""Metrics: a registry per instance, nothing registered at import, Prometheus naming conventions."""

from __future__ import annotations

import importlib

from prometheus_client import REGISTRY, CollectorRegistry

import nmt.server.metrics
from nmt.server.metrics import Metrics


def names(registry: CollectorRegistry) -> set[str]:
    return {metric.name for metric in registry.collect()}


def test_nothing_registered_at_import() -> None:
    before = names(REGISTRY)
    importlib.reload(nmt.server.metrics)
    assert not any(n.startswith("nmt_") for n in names(REGISTRY)) and names(REGISTRY) == before


def test_two_instances_do_not_clash_and_follow_the_conventions() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    Metrics(first)
    m = Metrics(second, process=False)
    m.requests.labels("Translate", "OK").inc()
    m.batch_sentences.observe(3)
    m.set_model(name="tiny", precision="fp32-cpu")
    assert second.get_sample_value("nmt_requests_total", {"method": "Translate", "code": "OK"}) == 1
    assert first.get_sample_value("nmt_requests_total", {"method": "Translate", "code": "OK"}) is None
    assert second.get_sample_value("nmt_batch_sentences_sum") == 3
    assert second.get_sample_value("nmt_model_info", {"name": "tiny", "precision": "fp32-cpu"}) == 1
    assert "process_resident_memory_bytes" in {s.name for f in first.collect() for s in f.samples}
    assert not any(n.startswith("process_") for n in names(second))
    for family in second.collect():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.name.endswith("_seconds"):
            assert family.type == "histogram"
