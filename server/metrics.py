"""Prometheus metrics of the server. Nothing is registered at import: Metrics(registry) does it.

Every per-request and per-batch series carries `model` and `version`: the served model's name (a single
bundle: its own name; a repository: the directory's) and version. Their cardinality is bounded by what is
loaded: a request refused before it reaches a model (unparsable, oversized, no token, an unknown model)
counts under model="" and version="", never under the name it asked for; a model's gauge and info series
are removed when it is unloaded or replaced by another version (ModelMetrics.remove). Rules aggregate
with sum by (...), so they work whatever the models.

    nmt_requests_total{method,code,model,version}   finished requests by the gRPC status code clients saw:
                                                a unary call once; each TranslateStream answer once (by the
                                                code in it), a stream that fails once more; requests refused
                                                before the servicer (unparsable, oversized, no token) too
    nmt_request_duration_seconds{method,model,version}   latency of the requests the servicer answered
    nmt_requests_in_flight{method,model,version}   RPCs being handled (model="" until the request is routed)
    nmt_queue_wait_seconds{model,version}       enqueue -> batch start, per sentence (histogram)
    nmt_queue_sentences{model,version}          sentences waiting for a batch (one queue per model)
    nmt_batch_sentences / nmt_batch_tokens{model,version}   engine batch size: sentences, padded source tokens
    nmt_encode_duration_seconds / nmt_decode_duration_seconds{model,version}   engine compute per batch
    nmt_input_tokens_total / nmt_generated_tokens_total{model,version}   source tokens in, hypothesis tokens out
    nmt_engine_turn_wait_seconds                time an engine step waited for other models' steps (repository
                                                mode, --engine-turns on: engine/turns.py); steps that found the
                                                engine free are not counted
    nmt_model_loads_total{outcome}              model loads over the control API (Triton's repository
                                                extension): outcome="loaded" or "failed" (what served before
                                                a failed load keeps serving)
    nmt_model_info{model,version,name,...} 1    each model being served
    nmt_engine_info{model,version,device,provider,variant,onnxruntime,selfcheck} 1
                                                what runs each model: the device asked for, the execution
                                                provider and graph variant in use (a GPU deployment can alert
                                                on provider!="CUDAExecutionProvider"), the start-up self-check
plus process_* and python_* (the default process, platform and GC collectors) in the same registry.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MODEL = ["model", "version"]  # the labels of every per-model series
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, process: bool = True):
        self.registry = registry
        r = {"registry": registry}
        self.requests = Counter(
            "nmt_requests",
            "Finished requests by method and the gRPC status code sent.",
            ["method", "code", *MODEL],
            **r,
        )
        self.request_seconds = Histogram(
            "nmt_request_duration_seconds", "RPC latency.", ["method", *MODEL], buckets=LATENCY_BUCKETS, **r
        )
        self.in_flight = Gauge("nmt_requests_in_flight", "RPCs being handled.", ["method", *MODEL], **r)
        self.queue_wait = Histogram(
            "nmt_queue_wait_seconds",
            "Time a sentence waits in the queue for its batch.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            **r,
        )
        self.queue_depth = Gauge("nmt_queue_sentences", "Sentences waiting in the queue.", MODEL, **r)
        self.batch_sentences = Histogram(
            "nmt_batch_sentences", "Sentences per engine batch.", MODEL, buckets=SIZE_BUCKETS, **r
        )
        self.batch_tokens = Histogram(
            "nmt_batch_tokens", "Padded source tokens per engine batch.", MODEL, buckets=TOKEN_BUCKETS, **r
        )
        self.encode_seconds = Histogram(
            "nmt_encode_duration_seconds", "Encoder time per engine batch.", MODEL, buckets=COMPUTE_BUCKETS, **r
        )
        self.decode_seconds = Histogram(
            "nmt_decode_duration_seconds",
            "Search (decoder) time per engine batch.",
            MODEL,
            buckets=COMPUTE_BUCKETS,
            **r,
        )
        self.input_tokens = Counter("nmt_input_tokens", "Source tokens translated.", MODEL, **r)
        self.generated_tokens = Counter("nmt_generated_tokens", "Tokens in the returned hypotheses.", MODEL, **r)
        self.turn_wait = Histogram(
            "nmt_engine_turn_wait_seconds",
            "Time an engine step waited for other models' steps (engine turns).",
            buckets=COMPUTE_BUCKETS,
            **r,
        )
        self.model_loads = Counter(
            "nmt_model_loads", "Model loads requested over the control API, by outcome.", ["outcome"], **r
        )
        self.model_info = Info("nmt_model", "The models being served.", MODEL, **r)
        self.engine_info = Info(
            "nmt_engine", "The execution provider and graph variant serving each model.", MODEL, **r
        )
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def model(
        self, name: str, version: str, *, info: dict[str, Any] | None = None, engine: dict[str, Any] | None = None
    ) -> ModelMetrics:
        """The series of one model version (its scheduler observes through them); `info` and `engine` are
        its nmt_model_info and nmt_engine_info labels, published by ModelMetrics.publish()."""
        return ModelMetrics(self, name, version, info or {}, engine or {})

    def serve(self, port: int, addr: str = "0.0.0.0") -> MetricsServer:
        """Serve /metrics of this registry on its own HTTP port (0 = any free port), in a thread."""
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        return MetricsServer(server, thread)


def sample_sum(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The sum of the samples `name` whose labels include `labels` (None: no such sample): a counter or
    histogram summed over the labels not given, e.g. every model's nmt_requests_total of one method and code."""
    want = (labels or {}).items()
    found = [
        s.value for family in registry.collect() for s in family.samples if s.name == name and want <= s.labels.items()
    ]
    return sum(found) if found else None


class ModelMetrics:
    """One model version's series: the per-batch metrics bound to its labels, and its info series."""

    def __init__(self, metrics: Metrics, name: str, version: str, info: dict[str, Any], engine: dict[str, Any]):
        self.parent, self.registry = metrics, metrics.registry
        self.labels = {"model": name, "version": str(version)}
        self.info = {k: str(v) for k, v in info.items()}
        self.engine = {k: str(v) for k, v in engine.items()}
        m, labels = metrics, self.labels
        self.queue_wait = m.queue_wait.labels(**labels)
        self.queue_depth = m.queue_depth.labels(**labels)
        self.batch_sentences = m.batch_sentences.labels(**labels)
        self.batch_tokens = m.batch_tokens.labels(**labels)
        self.encode_seconds = m.encode_seconds.labels(**labels)
        self.decode_seconds = m.decode_seconds.labels(**labels)
        self.input_tokens = m.input_tokens.labels(**labels)
        self.generated_tokens = m.generated_tokens.labels(**labels)

    def publish(self) -> None:
        """nmt_model_info and nmt_engine_info of this version (when it starts serving)."""
        self.parent.model_info.labels(**self.labels).info(self.info)
        self.parent.engine_info.labels(**self.labels).info(self.engine)
        self.queue_depth = self.parent.queue_depth.labels(**self.labels)  # again, after a remove()

    def remove(self) -> None:
        """Drop this version's gauge and info series (it no longer serves). Counters and histograms stay:
        they are cumulative, and bounded by the versions ever loaded."""
        values = tuple(self.labels.values())
        for metric in (self.parent.queue_depth, self.parent.model_info, self.parent.engine_info):
            try:
                metric.remove(*values)
            except KeyError:
                pass  # never set


class MetricsServer:
    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread):
        self.server, self.thread = server, thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
