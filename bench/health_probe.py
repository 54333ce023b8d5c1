"""Health-check latency while clients load the server, as a liveness probe sees it: from a process of
its own (a prober in the clients' process would measure their event loop too).

    python -m nmt.bench.health_probe TARGET SECONDS   # prints the latencies (s) as a JSON list

`under_load` starts that prober, runs `clients` closed-loop clients sending what `texts` gives for
the same time, and returns the prober's latencies with the clients' outcome codes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nmt.server.nmt_pb import translation_pb2 as pb
from nmt.server.nmt_pb import translation_pb2_grpc as pb_grpc

INTERVAL_S = 0.01  # one health check every 10 ms, as tests/server/test_fuzz.py does


def probe(target: str, seconds: float) -> list[float]:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before timing
        latencies, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append(time.perf_counter() - started)
            time.sleep(INTERVAL_S)
    return latencies


async def under_load(
    target: str, texts: Callable[[int], list[str]], clients: int, seconds: float, options: pb.DecodeOptions
) -> tuple[list[float], dict[str, int]]:
    """Health-check latencies (s) from a prober process while `clients` send texts(i) for `seconds`."""
    prober = subprocess.Popen(
        [sys.executable, "-m", "nmt.bench.health_probe", target, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    codes: collections.Counter[str] = collections.Counter()
    end = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TranslationServiceStub(channel)

        async def client(first: int) -> None:
            i = first
            while time.perf_counter() < end:
                try:
                    await stub.Translate(pb.TranslateRequest(texts=texts(i), options=options), timeout=120)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))
    out, _ = await asyncio.to_thread(prober.communicate, timeout=seconds + 60)
    if prober.returncode != 0:
        raise RuntimeError(f"health prober exited with {prober.returncode}")
    return json.loads(out), dict(codes)


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], float(sys.argv[2]))))
