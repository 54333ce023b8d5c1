"""The committed generated code (server/nmt_pb) matches protos/: regenerate with `python -m server.protogen`."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from server import protogen
from server.nmt_pb import translation_pb2, translation_pb2_grpc

grpc_tools = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (the dev extra) generates the code")
HINT = "the generated code is stale: run `python -m server.protogen`"


def without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc's descriptor sets carry json_name; the embedded descriptor does not."""
    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
    return file


def test_descriptor_matches_the_proto(tmp_path: Path) -> None:
    """Independent of the grpcio-tools version: the compiled proto equals the committed descriptor."""
    out = tmp_path / "set.pb"
    args = ["protoc", f"-I{protogen.PROTO_ROOT}", f"--descriptor_set_out={out}", *protogen.proto_files()]
    assert grpc_tools.main(args) == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    committed = descriptor_pb2.FileDescriptorProto.FromString(translation_pb2.DESCRIPTOR.serialized_pb)
    assert [f.name for f in compiled] == ["nmt/v1/translation.proto"]
    assert without_json_names(compiled[0]) == committed, HINT


def test_generated_files_are_current() -> None:
    """Byte for byte, when this grpcio-tools is the version the committed code was made with."""
    tools = importlib.metadata.version("grpcio-tools")
    if tools != translation_pb2_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(f"grpcio-tools {tools} differs from {translation_pb2_grpc.GRPC_GENERATED_VERSION}, "
                    "which generated the committed code (the descriptor test still checks it)")
    assert protogen.stale_files() == [], HINT


def test_check_mode_and_layout(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path / "nmt_pb")
    assert sorted(p.name for p in written) == ["__init__.py", "translation_pb2.py", "translation_pb2.pyi",
                                               "translation_pb2_grpc.py"]
    grpc_code = (tmp_path / "nmt_pb" / "translation_pb2_grpc.py").read_text()
    assert "from . import translation_pb2" in grpc_code and "from nmt.v1" not in grpc_code
    result = subprocess.run([sys.executable, "-m", "server.protogen", "--check"], cwd=protogen.ROOT,
                            capture_output=True, text=True, timeout=60)
    tools = importlib.metadata.version("grpcio-tools")
    if tools == translation_pb2_grpc.GRPC_GENERATED_VERSION:
        assert result.returncode == 0, result.stderr
