"""Generate the Python code for protos/nmt/v1/*.proto into server/nmt_pb/ (a build step).

    python -m server.protogen            # regenerate the committed code
    python -m server.protogen --check    # exit 1 when the committed code is stale

Needs grpcio-tools (the `dev` extra); the server itself only imports the generated code.
protoc writes `from nmt.v1 import translation_pb2` into the *_grpc.py files, which would need a
top-level `nmt` package; the import is rewritten to a relative one so the code lives inside
`server`. Descriptors keep their proto path (nmt/v1/translation.proto), which reflection shows.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PROTO_PACKAGE = "nmt/v1"
OUT_DIR = Path(__file__).resolve().parent / "nmt_pb"
INIT = '"""Code generated from protos/nmt/v1 by `python -m server.protogen`: do not edit."""\n'
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[str]:
    """Proto paths relative to protos/, e.g. ["nmt/v1/translation.proto"]."""
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def _relative_imports(text: str) -> str:
    package = PROTO_PACKAGE.replace("/", ".")
    return re.sub(rf"^from {re.escape(package)} import ", "from . import ", text, flags=re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpc_tools) on every proto; write the package to out_dir; return the files written."""
    from grpc_tools import protoc  # dev-only dependency

    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *proto_files()]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / "__init__.py"]
        written[0].write_text(INIT)
        for source in sorted((Path(tmp) / PROTO_PACKAGE).iterdir()):
            if source.name.endswith(SUFFIXES):
                target = out_dir / source.name
                target.write_text(_relative_imports(source.read_text()))
                written.append(target)
    return written


def stale_files(committed: Path = OUT_DIR) -> list[str]:
    """Names of generated files that are missing, different, or left over in `committed`."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    have = {p.name: p.read_text() for p in committed.glob("*.py*")} if committed.is_dir() else {}
    return sorted(name for name in fresh.keys() | have.keys() if fresh.get(name) != have.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {OUT_DIR.relative_to(ROOT) / name}", file=sys.stderr)
        return 1 if stale else 0
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    for path in generate(OUT_DIR):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
