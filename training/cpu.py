"""What the CPU can do, read at run time: the machines here differ (AMD EPYC with AVX-512 BF16,
Intel Xeon with AMX), and bf16 autocast only pays where the CPU multiplies bf16 natively."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# Instruction sets that give oneDNN native bf16 matrix products.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{'model': 'AMD EPYC ...', 'flags': [...], 'cores': N} from /proc/cpuinfo (or what Python knows)."""
    import os

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": sorted(flags), "cores": os.cpu_count()}


def cpu_has_fast_bf16() -> bool:
    flags = set(cpu_info()["flags"])
    return any(f in flags for f in BF16_FLAGS)


def cpu_summary() -> str:
    info = cpu_info()
    flags = set(info["flags"])
    shown = " ".join(f for f in REPORTED_FLAGS if f in flags) or "none of " + " ".join(REPORTED_FLAGS)
    return f"{info['model']}, {info['cores']} cores; flags: {shown}"
