"""Registers the Generation service on a gRPC server so that a request body protobuf cannot parse
(invalid UTF-8 in a string field, a corrupt wire format, a Struct nested past the parser's limit) is
answered with INVALID_ARGUMENT and the parser's message, where grpc's generated registration would let
the DecodeError escape as UNKNOWN.

The handlers are the generated ones' (one per method of the service descriptor, same serializers); this
module only wraps the request parser and refuses the unparsed body before the servicer's method runs.
It must not validate fields: that is `controlplane.validation`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"]


class Unparsed:
    """A request body that its message type could not parse."""

    def __init__(self, type_name: str, error: str) -> None:
        self.message = f"malformed {type_name}: {error}"


def _parser(message_type: Any) -> Callable[[bytes], Any]:
    def parse(body: bytes) -> Any:
        try:
            return message_type.FromString(body)
        except DecodeError as exc:
            return Unparsed(message_type.DESCRIPTOR.name, str(exc))
    return parse


def _refusing(method: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    """`method` behind a check that refuses an Unparsed request (`streaming`: the method's responses are
    a stream, so the wrapper is an async generator too)."""
    if streaming:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Unparsed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async with aclosing(method(request, context)) as responses:  # closed with the call, not later
                async for response in responses:
                    yield response
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unparsed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)
    return unary


def add_generation_service(servicer: object, server: grpc.aio.Server) -> None:
    """Register every method of the Generation service on `server`, bound to `servicer`'s methods."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        if method.client_streaming:
            raise NotImplementedError(f"{method.name}: client-streaming methods are not registered here")
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            _refusing(getattr(servicer, method.name), method.server_streaming),
            request_deserializer=_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
