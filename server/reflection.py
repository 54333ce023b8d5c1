"""Server reflection under both names clients ask for: grpc.reflection.v1 (grpcurl and Postman try it
first) and grpc.reflection.v1alpha.

grpcio-reflection ships only v1alpha (grpc/grpc#38576). v1 is the same protocol renamed, with the
same messages and field numbers, so one servicer answers both; a renamed copy of the v1alpha file
descriptor in the pool lets clients describe grpc.reflection.v1 itself as well.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _rename(message: object, attribute: str, old: str) -> None:
    """Point a fully qualified type name at the v1 package (fields are proto2: only set what changes)."""
    name = getattr(message, attribute)
    if name.startswith(f".{old}."):
        setattr(message, attribute, f".{V1_PACKAGE}.{name[len(old) + 2 :]}")


def add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add grpc/reflection/v1/reflection.proto to `pool` (once), made from the v1alpha file."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    old = proto.package
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            _rename(field, "type_name", old)
    for service in proto.service:
        for method in service.method:
            _rename(method, "input_type", old)
            _rename(method, "output_type", old)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> tuple[str, ...]:
    """Serve reflection (v1 and v1alpha) for `service_names` and itself; the names it lists."""
    pool = descriptor_pool.Default()
    add_v1_descriptor(pool)
    names = (*service_names, V1_SERVICE, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(  # v1alpha messages: the same bytes on the wire
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1}),))
    return names
