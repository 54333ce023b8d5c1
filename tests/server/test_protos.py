"""The committed generated code (server/nmt_pb, server/kserve_pb) matches protos/: regenerate with
`python -m nmt.server.protogen`."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from nmt.server import protogen
from nmt.server.kserve_pb import grpc_predict_v2_pb2
from nmt.server.nmt_pb import translation_pb2, translation_pb2_grpc

grpc_tools = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (the dev extra) generates the code")
HINT = "the generated code is stale: run `python -m nmt.server.protogen`"


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
    """Independent of the grpcio-tools version: the compiled protos equal the committed descriptors."""
    out = tmp_path / "set.pb"
    args = ["protoc", f"-I{protogen.PROTO_ROOT}", f"--descriptor_set_out={out}", *protogen.proto_files()]
    assert grpc_tools.main(args) == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    committed = [
        descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        for module in (grpc_predict_v2_pb2, translation_pb2)
    ]
    assert [f.name for f in compiled] == ["kserve/v2/grpc_predict_v2.proto", "nmt/v1/translation.proto"]
    assert [without_json_names(f) for f in compiled] == committed, HINT


def test_kserve_code_has_a_descriptor_pool_of_its_own() -> None:
    """tritonclient, kserve and MLServer register package `inference` in the default pool: ours must not."""
    from google.protobuf import descriptor_pool

    assert grpc_predict_v2_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert translation_pb2.DESCRIPTOR.pool is descriptor_pool.Default()  # reflection serves it from there
    with pytest.raises(KeyError):  # (tritonclient's grpc_service.proto may well be there)
        descriptor_pool.Default().FindFileByName(grpc_predict_v2_pb2.DESCRIPTOR.name)
    assert grpc_predict_v2_pb2.ModelInferRequest(model_name="m").SerializeToString() == b"\n\x01m"


def test_generated_files_are_current() -> None:
    """Byte for byte, when this grpcio-tools is the version the committed code was made with."""
    tools = importlib.metadata.version("grpcio-tools")
    if tools != translation_pb2_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(
            f"grpcio-tools {tools} differs from {translation_pb2_grpc.GRPC_GENERATED_VERSION}, "
            "which generated the committed code (the descriptor test still checks it)"
        )
    assert protogen.stale_files() == [], HINT


def test_check_mode_and_layout(tmp_path: Path) -> None:
    nmt, kserve = protogen.PROTO_SETS
    written = protogen.generate(nmt, tmp_path / "nmt_pb")
    assert sorted(p.name for p in written) == [
        "__init__.py",
        "translation_pb2.py",
        "translation_pb2.pyi",
        "translation_pb2_grpc.py",
    ]
    grpc_code = (tmp_path / "nmt_pb" / "translation_pb2_grpc.py").read_text()
    assert "from . import translation_pb2" in grpc_code and "from nmt.v1" not in grpc_code
    written = protogen.generate(kserve, tmp_path / "kserve_pb")
    assert sorted(p.name for p in written) == [
        "__init__.py",
        "grpc_predict_v2_pb2.py",
        "grpc_predict_v2_pb2.pyi",
        "grpc_predict_v2_pb2_grpc.py",
    ]
    grpc_code = (tmp_path / "kserve_pb" / "grpc_predict_v2_pb2_grpc.py").read_text()
    assert "from . import grpc_predict_v2_pb2" in grpc_code and "from kserve.v2" not in grpc_code
    assert protogen.PRIVATE_POOL in (tmp_path / "kserve_pb" / "grpc_predict_v2_pb2.py").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "nmt.server.protogen", "--check"],
        cwd=protogen.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    tools = importlib.metadata.version("grpcio-tools")
    if tools == translation_pb2_grpc.GRPC_GENERATED_VERSION:
        assert result.returncode == 0, result.stderr
