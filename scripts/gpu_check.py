"""Checks behind scripts/gpu_check.sh, one subcommand each; every one exits non-zero with one line on failure.

    gpu_check.py requirements [--no-cuda-pins]  pip requirements of the check's venv (system Python: tomllib only)
    gpu_check.py env --device cuda --out F    versions and providers; a tiny graph must run on the device's provider
    gpu_check.py parity BUNDLE --variant V --provider P --out F    the export's parity verdict for V, from the manifest
    gpu_check.py selfcheck BUNDLE --device D --precision P --out F the start-up self-check (engine/selfcheck.py), forced
    gpu_check.py texts                        the English test texts, one a line
    gpu_check.py german FILE                  every line a non-empty German translation
    gpu_check.py metrics URL --provider P --out F                   nmt_engine_info of a running nmt-serve
    gpu_check.py bench-summary DECODE_JSON    one line per nmt-bench decode row

`requirements` needs only the standard library (the venv does not exist yet); the others run in the
check's venv. Their output goes to stdout (JSON where --out also gets it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# onnxruntime-gpu's extras `cuda` and `cudnn` name the CUDA 13 + cuDNN 9 runtime wheels its CUDA provider
# loads (libcublasLt.so.13, libcublas.so.13, libcudart.so.13, libcurand.so.10: NEEDED by
# libonnxruntime_providers_cuda.so; libcudnn.so.9, libnvrtc.so.13 loaded at run time). They install
# under site-packages/nvidia/cu13/lib and nvidia/cudnn/lib, which gpu_check.sh puts on LD_LIBRARY_PATH.
# Pinned as pip resolved `onnxruntime-gpu[cuda,cudnn]==1.31.1` on PyPI (CUDA 13.x runtimes run on
# any CUDA 13 driver, >= 580, by minor-version compatibility).
CUDA_WHEELS = (
    "nvidia-cuda-runtime==13.5.37",
    "nvidia-cuda-nvrtc==13.5.37",
    "nvidia-cublas==13.10.0.20",
    "nvidia-cudnn-cu13==9.28.1.4",
    "nvidia-curand==10.4.5.25",
    "nvidia-cufft==12.5.0.14",
    "nvidia-nvjitlink==13.5.37",
)
CTRANSLATE2 = "ctranslate2==4.8.5"  # the version bench/results/decode.md was measured with
# Words of which a German sentence of Multi30k's kind has at least one (articles, prepositions, verbs).
GERMAN_WORDS = frozenset(
    """ein eine einer einem einen der die das den dem des und mit auf im in an am vor
    zwei drei vier mann frau kind hund ist sind steht sitzt läuft fährt spielt trägt von zu bei über unter""".split()
)
TEST_TEXTS = (
    "A man is riding a bicycle down the street.",
    "Two dogs are playing in the snow.",
    "A woman in a red dress sits on a bench.",
)


def _pin(constraints: str, name: str) -> str:
    for line in (ROOT / "deploy" / "constraints" / constraints).read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.strip()
    raise SystemExit(f"deploy/constraints/{constraints} pins no {name}")


def requirements(cuda_pins: bool = True) -> list[str]:
    """The project's base, train, export and gpu dependencies and CTranslate2, with onnxruntime-gpu
    (its CUDA/cuDNN wheels pinned) in place of onnxruntime: both install the module `onnxruntime`, so
    the CPU package must never come in beside it. cuda_pins=False leaves the CUDA wheels' versions to
    pip: PyPI's CUDA build of torch pins its own (nvidia-cudnn-cu13==9.20.0.48, ...)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    keep: list[str] = []
    for req in [*project["dependencies"], *extras["train"], *extras["export"], *extras["gpu"]]:
        name = re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower()
        if name not in ("onnxruntime", "onnxruntime-gpu", "nmt-service") and req not in keep:
            keep.append(req)
    ort_gpu = _pin("cuda.txt", "onnxruntime-gpu").replace("onnxruntime-gpu", "onnxruntime-gpu[cuda,cudnn]")
    return [*keep, CTRANSLATE2, ort_gpu, *(CUDA_WHEELS if cuda_pins else ())]


def _write(out: str | None, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False)
    if out:
        Path(out).write_text(text + "\n")
    print(text)


def _tiny_graph() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "tiny", [x], [y])
    # IR 10, as the exporter writes: onnx's default (14 with onnx 1.23) is newer than onnxruntime-gpu 1.31 reads.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString()


def env(device: str, out: str | None) -> None:
    """Versions, providers, and a MatMul run on the device's provider (CUDA: no CPU fallback)."""
    import ctranslate2
    import numpy as np
    import onnxruntime as ort
    import torch

    import nmt.server.main  # noqa: F401 - the server imports (grpc, protos) work

    provider = CUDA if device == "cuda" else CPU
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "ctranslate2": ctranslate2.__version__,
        "numpy": np.__version__,
        "device": ort.get_device(),
        "providers": ort.get_available_providers(),
        "ctranslate2_cuda_devices": ctranslate2.get_cuda_device_count(),
    }
    if provider not in info["providers"]:
        _write(out, info)
        raise SystemExit(f"onnxruntime {ort.__version__} has no {provider} (has {info['providers']})")
    options = {"enable_fallback": 0} if provider == CUDA else {}
    try:
        session = ort.InferenceSession(_tiny_graph(), providers=[provider], **options)
        result = session.run(None, {"x": np.eye(2, dtype=np.float32)})[0]
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind types; the message is what matters
        _write(out, info)
        raise SystemExit(f"{provider} does not start: {' '.join(str(e).split())}") from e
    info["tiny_graph"] = {"provider": session.get_providers()[0], "ok": bool(np.allclose(result, np.eye(2)))}
    _write(out, info)
    if info["tiny_graph"]["provider"] != provider or not info["tiny_graph"]["ok"]:
        raise SystemExit(
            f"{provider} did not start: onnxruntime ran a MatMul on {info['tiny_graph']['provider']} "
            "instead (its log above names the library it could not load)"
            if info["tiny_graph"]["ok"]
            else f"a MatMul on {provider} gave a wrong result"
        )


def parity(bundle: str, variant: str, provider: str, out: str | None) -> None:
    """The variant was written, and the export checked it on `provider` (not skipped) and passed."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    entry = manifest.get("variants", {}).get(variant)
    report = manifest.get("parity") or {}
    verdict = (report.get("variants") or {}).get(variant)
    brief = ", ".join(
        f"{key} {verdict[key]}"
        for key in ("provider", "checked_against", "greedy_identical", "bleu", "bleu_loss", "skipped")
        if key in (verdict or {})
    )
    _write(
        out,
        {
            "variant": variant,
            "brief": brief,
            "verdict": verdict,
            "set": report.get("set"),
            "sentences": report.get("sentences"),
            "torch_bleu": report.get("torch_bleu"),
            "variants": sorted(manifest.get("variants", {})),
        },
    )
    if entry is None or verdict is None:
        raise SystemExit(f"{bundle} has no {variant} variant or no parity verdict for it")
    if "skipped" in verdict:
        raise SystemExit(f"the export skipped {variant}'s parity: {verdict['skipped']}")
    if verdict.get("provider") != provider:
        raise SystemExit(f"{variant}'s parity ran on {verdict.get('provider')}, not {provider}")


def selfcheck(bundle: str, device: str, precision: str, out: str | None) -> None:
    """engine/selfcheck.py's reference run on the variant nmt-serve would pick, whatever the export checked."""
    from nmt.engine.runtime import RuntimeConfig
    from nmt.engine.selfcheck import Reference, SelfCheckError
    from nmt.engine.selfcheck import selfcheck as run_selfcheck
    from nmt.engine.translator import Translator

    translator = Translator.from_bundle(bundle, RuntimeConfig(device=device, precision=precision))
    sessions = translator.sessions
    reference = Reference.from_manifest(sessions.manifest or {})
    info = {
        "variant": sessions.variant,
        "provider": sessions.provider,
        "sentences": 0 if reference is None else len(reference.sources),
    }
    if reference is None:
        _write(out, {**info, "passed": False})
        raise SystemExit(f"{bundle} has no parity.reference to self-check with")
    try:
        run_selfcheck(translator, reference)
    except SelfCheckError as e:
        _write(out, {**info, "passed": False, "error": str(e)})
        raise SystemExit(str(e)) from e
    _write(out, {**info, "passed": True})


def german(path: str) -> None:
    """One translation per line, each non-empty, not the English text, with a common German word."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if len(lines) != len(TEST_TEXTS):
        raise SystemExit(f"{path}: {len(lines)} lines for {len(TEST_TEXTS)} texts")
    for source, line in zip(TEST_TEXTS, lines):
        words = set(re.findall(r"\w+", line.lower()))
        if not line.strip() or line.strip() == source or not words & GERMAN_WORDS:
            raise SystemExit(f"not a German translation of {source!r}: {line!r}")
    print(f"{len(lines)} German translations")


def metrics(url: str, provider: str, out: str | None) -> None:
    """nmt_engine_info from /metrics: the provider must be `provider`, the self-check not failed."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback URL from the port file
        text = response.read().decode()
    line = next((x for x in text.splitlines() if x.startswith("nmt_engine_info{")), None)
    if line is None:
        raise SystemExit(f"{url} has no nmt_engine_info")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    _write(out, labels)
    if labels.get("provider") != provider:
        raise SystemExit(f"nmt-serve runs on {labels.get('provider')}, not {provider}")


def bench_summary(path: str) -> None:
    results = json.loads(Path(path).read_text())
    for row in results["decode"]:
        same = row["identical_to_torch"]
        print(
            f"  {row['engine']:<14} {row['mode']:<6} b={row['batch_size']:<3} {row['tokens_per_s']:>9.1f} tok/s  "
            f"p50 {row['p50_ms']:>8.2f} ms" + ("" if same is None else f"  same as torch {same}/{row['sentences']}")
        )
    for name, why in results.get("skipped", {}).items():
        print(f"  skipped {name}: {why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("requirements")
    p.add_argument("--no-cuda-pins", action="store_true", help="leave the nvidia-* versions to pip (CUDA torch)")
    p = sub.add_parser("env")
    p.add_argument("--device", choices=["cpu", "cuda"], required=True)
    p.add_argument("--out")
    p = sub.add_parser("parity")
    p.add_argument("bundle")
    p.add_argument("--variant", required=True)
    p.add_argument("--provider", choices=[CPU, CUDA], required=True)
    p.add_argument("--out")
    p = sub.add_parser("selfcheck")
    p.add_argument("bundle")
    p.add_argument("--device", choices=["cpu", "cuda"], required=True)
    p.add_argument("--precision", required=True)
    p.add_argument("--out")
    sub.add_parser("texts")
    p = sub.add_parser("german")
    p.add_argument("file")
    p = sub.add_parser("metrics")
    p.add_argument("url")
    p.add_argument("--provider", choices=[CPU, CUDA], required=True)
    p.add_argument("--out")
    p = sub.add_parser("bench-summary")
    p.add_argument("decode_json")
    args = parser.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(requirements(cuda_pins=not args.no_cuda_pins)))
    elif args.command == "texts":
        print("\n".join(TEST_TEXTS))
    elif args.command == "env":
        env(args.device, args.out)
    elif args.command == "parity":
        parity(args.bundle, args.variant, args.provider, args.out)
    elif args.command == "selfcheck":
        selfcheck(args.bundle, args.device, args.precision, args.out)
    elif args.command == "german":
        german(args.file)
    elif args.command == "metrics":
        metrics(args.url, args.provider, args.out)
    else:
        bench_summary(args.decode_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
