"""Metrics: a registry per instance, nothing registered at import, Prometheus naming conventions."""

from __future__ import annotations

import importlib

from prometheus_client import REGISTRY, CollectorRegistry

import nmt.server.metrics
from nmt.server.metrics import Metrics, sample_sum


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
    m.requests.labels("Translate", "OK", "tiny", "1").inc()
    tiny = m.model("tiny", "1", info={"name": "tiny", "precision": "fp32-cpu"}, engine={"provider": "CPU"})
    tiny.batch_sentences.observe(3)
    tiny.publish()
    ok = {"method": "Translate", "code": "OK", "model": "tiny", "version": "1"}
    assert second.get_sample_value("nmt_requests_total", ok) == 1
    assert first.get_sample_value("nmt_requests_total", ok) is None
    assert second.get_sample_value("nmt_batch_sentences_sum", {"model": "tiny", "version": "1"}) == 3
    assert (
        second.get_sample_value(
            "nmt_model_info", {"model": "tiny", "version": "1", "name": "tiny", "precision": "fp32-cpu"}
        )
        == 1
    )
    assert "process_resident_memory_bytes" in {s.name for f in first.collect() for s in f.samples}
    assert not any(n.startswith("process_") for n in names(second))
    for family in second.collect():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.name.endswith("_seconds"):
            assert family.type == "histogram"


def series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    return [s.labels for f in registry.collect() for s in f.samples if s.name == name]


def test_each_model_has_its_own_series_and_an_unloaded_ones_gauges_go() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry, process=False)
    a = m.model("a", "1", info={"name": "a", "src_lang": "en"}, engine={"provider": "CPU", "selfcheck": "passed"})
    b = m.model("b", "2", info={"name": "b", "src_lang": "de"}, engine={"provider": "CPU", "selfcheck": "passed"})
    for model in (a, b):
        model.publish()
    a.queue_depth.set(4)
    b.queue_depth.set(1)
    b.batch_sentences.observe(2)
    assert [(s["model"], s["version"]) for s in series(registry, "nmt_engine_info")] == [("a", "1"), ("b", "2")]
    assert sample_sum(registry, "nmt_queue_sentences") == 5
    assert sample_sum(registry, "nmt_queue_sentences", {"model": "b"}) == 1
    b.remove()  # unloaded: its gauge and info series go, its counters stay
    b.remove()  # twice is harmless
    assert [s["model"] for s in series(registry, "nmt_queue_sentences")] == ["a"]
    assert [s["model"] for s in series(registry, "nmt_model_info")] == ["a"]
    assert [s["model"] for s in series(registry, "nmt_engine_info")] == ["a"]
    assert sample_sum(registry, "nmt_batch_sentences_sum", {"model": "b"}) == 2
    assert sample_sum(registry, "nmt_batch_sentences_sum", {"model": "c"}) is None
    b.publish()  # loaded again
    assert sample_sum(registry, "nmt_queue_sentences", {"model": "b"}) == 0
