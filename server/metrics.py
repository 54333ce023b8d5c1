"""Prometheus metrics of the server. Nothing is registered at import: Metrics(registry) does it.

    nmt_requests_total{method,code}             finished requests by the gRPC status code clients saw:
                                                a unary call once; each TranslateStream answer once (by the
                                                code in it), a stream that fails once more; requests refused
                                                before the servicer (unparsable, oversized, no token) too
    nmt_request_duration_seconds{method}        latency of the requests the servicer answered (histogram)
    nmt_requests_in_flight{method}              RPCs being handled
    nmt_queue_wait_seconds                      enqueue -> batch start, per sentence (histogram)
    nmt_queue_sentences                         sentences waiting for a batch
    nmt_batch_sentences / nmt_batch_tokens      engine batch size: sentences, padded source tokens
    nmt_encode_duration_seconds / nmt_decode_duration_seconds   engine compute per batch
    nmt_input_tokens_total / nmt_generated_tokens_total         source tokens in, hypothesis tokens out
    nmt_model_loads_total{outcome}              model loads over the control API (Triton's repository
                                                extension): outcome="loaded" or "failed" (what served before
                                                a failed load keeps serving)
    nmt_model_info{name,version,...} 1          the model being served
    nmt_engine_info{device,provider,variant,onnxruntime,selfcheck} 1
                                                what runs it: the device asked for, the execution provider
                                                and graph variant in use (a GPU deployment can alert on
                                                provider!="CUDAExecutionProvider"), the start-up self-check
plus process_* and python_* (the default process, platform and GC collectors) in the same registry.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, process: bool = True):
        self.registry = registry
        r = {"registry": registry}
        self.requests = Counter("nmt_requests", "Finished requests by method and the gRPC status code sent.",
                                ["method", "code"], **r)
        self.request_seconds = Histogram("nmt_request_duration_seconds", "RPC latency.", ["method"],
                                         buckets=LATENCY_BUCKETS, **r)
        self.in_flight = Gauge("nmt_requests_in_flight", "RPCs being handled.", ["method"], **r)
        self.queue_wait = Histogram("nmt_queue_wait_seconds", "Time a sentence waits in the queue for its batch.",
                                    buckets=LATENCY_BUCKETS, **r)
        self.queue_depth = Gauge("nmt_queue_sentences", "Sentences waiting in the queue.", **r)
        self.batch_sentences = Histogram("nmt_batch_sentences", "Sentences per engine batch.",
                                         buckets=SIZE_BUCKETS, **r)
        self.batch_tokens = Histogram("nmt_batch_tokens", "Padded source tokens per engine batch.",
                                      buckets=TOKEN_BUCKETS, **r)
        self.encode_seconds = Histogram("nmt_encode_duration_seconds", "Encoder time per engine batch.",
                                        buckets=COMPUTE_BUCKETS, **r)
        self.decode_seconds = Histogram("nmt_decode_duration_seconds", "Search (decoder) time per engine batch.",
                                        buckets=COMPUTE_BUCKETS, **r)
        self.input_tokens = Counter("nmt_input_tokens", "Source tokens translated.", **r)
        self.generated_tokens = Counter("nmt_generated_tokens", "Tokens in the returned hypotheses.", **r)
        self.model_loads = Counter("nmt_model_loads", "Model loads requested over the control API, by outcome.",
                                   ["outcome"], **r)
        self.model = Info("nmt_model", "The model being served.", **r)
        self.engine = Info("nmt_engine", "The execution provider and graph variant serving requests.", **r)
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def set_model(self, **labels: str) -> None:
        self.model.info({k: str(v) for k, v in labels.items()})

    def set_engine(self, **labels: str) -> None:
        self.engine.info({k: str(v) for k, v in labels.items()})

    def serve(self, port: int, addr: str = "0.0.0.0") -> MetricsServer:
        """Serve /metrics of this registry on its own HTTP port (0 = any free port), in a thread."""
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        return MetricsServer(server, thread)


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
