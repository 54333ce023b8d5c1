"""Generate the Python code for the protos under protos/ into packages of server/ (a build step).

    python -m nmt.server.protogen            # regenerate the committed code
    python -m nmt.server.protogen --check    # exit 1 when the committed code is stale

    protos/nmt/v1/*.proto     -> server/nmt_pb/     our own API
    protos/kserve/v2/*.proto  -> server/kserve_pb/  the Open Inference Protocol (KServe v2), package `inference`

Needs grpcio-tools (the `dev` extra); the server itself only imports the generated code.
protoc writes `from nmt.v1 import translation_pb2` into the *_grpc.py files, which would need a
top-level `nmt` package; the import is rewritten to a relative one so the code lives inside
`server`. Descriptors keep their proto path (nmt/v1/translation.proto), which reflection shows.

The KServe code goes into its own descriptor pool instead of the process-wide default one:
tritonclient, kserve and MLServer each register their own copy of package `inference`, and a
second file defining `inference.ModelInferRequest` in the default pool fails to import ("duplicate
symbol", triton-inference-server/client#730). Messages are the same on the wire either way; the
cost is that server reflection cannot list that service.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path(__file__).resolve().parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


@dataclass(frozen=True)
class ProtoSet:
    """One folder of protos/ and the package of server/ its generated code goes to."""

    proto_dir: str  # relative to protos/, e.g. "nmt/v1"
    out_dir: Path
    private_pool: bool = False  # register the descriptors in a pool of their own (see the module docstring)

    @property
    def init(self) -> str:
        return f'"""Code generated from protos/{self.proto_dir} by `python -m nmt.server.protogen`: do not edit."""\n'


PROTO_SETS = (
    ProtoSet("nmt/v1", PACKAGE_DIR / "nmt_pb"),
    ProtoSet("kserve/v2", PACKAGE_DIR / "kserve_pb", private_pool=True),
)
PROTO_PACKAGE = PROTO_SETS[0].proto_dir
OUT_DIR = PROTO_SETS[0].out_dir


def proto_files(proto_set: ProtoSet | None = None) -> list[str]:
    """Proto paths relative to protos/ (of one set, or of all), e.g. ["nmt/v1/translation.proto"]."""
    sets = PROTO_SETS if proto_set is None else (proto_set,)
    return sorted(
        p.relative_to(PROTO_ROOT).as_posix() for s in sets for p in (PROTO_ROOT / s.proto_dir).glob("*.proto")
    )


def _relative_imports(text: str, proto_dir: str) -> str:
    package = proto_dir.replace("/", ".")
    return re.sub(rf"^from {re.escape(package)} import ", "from . import ", text, flags=re.MULTILINE)


def _private_pool(text: str, name: str) -> str:
    if text.count(DEFAULT_POOL) != 1:  # protoc's output changed: fail rather than share the default pool
        raise RuntimeError(f"{name}: expected one `{DEFAULT_POOL}` in protoc's output")
    return text.replace(DEFAULT_POOL, PRIVATE_POOL)


def generate(proto_set: ProtoSet = PROTO_SETS[0], out_dir: Path | None = None) -> list[Path]:
    """Run protoc (grpc_tools) on the set's protos; write the package to out_dir (default: the set's);
    return the files written."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir = proto_set.out_dir if out_dir is None else out_dir
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *proto_files(proto_set),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / "__init__.py"]
        written[0].write_text(proto_set.init)
        for source in sorted((Path(tmp) / proto_set.proto_dir).iterdir()):
            if source.name.endswith(SUFFIXES):
                text = _relative_imports(source.read_text(), proto_set.proto_dir)
                if proto_set.private_pool and source.name.endswith("_pb2.py"):
                    text = _private_pool(text, source.name)
                target = out_dir / source.name
                target.write_text(text)
                written.append(target)
    return written


def stale_files() -> list[str]:
    """Generated files (paths relative to the repository) that are missing, different, or left over."""
    stale = []
    for proto_set in PROTO_SETS:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = {p.name: p.read_text() for p in generate(proto_set, Path(tmp))}
        committed = proto_set.out_dir
        have = {p.name: p.read_text() for p in committed.glob("*.py*")} if committed.is_dir() else {}
        names = (name for name in fresh.keys() | have.keys() if fresh.get(name) != have.get(name))
        stale += [(committed / name).relative_to(ROOT).as_posix() for name in names]
    return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nmt.server.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    for proto_set in PROTO_SETS:
        shutil.rmtree(proto_set.out_dir, ignore_errors=True)
        for path in generate(proto_set):
            print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
