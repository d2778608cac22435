"""Encode and decode the inter-plane messages (msgpack via msgspec, one typed decoder per direction).

A frame that is not valid msgpack, or is not a member of the expected union, raises ProtocolError;
callers log and drop it. This module must not touch sockets.
"""

from __future__ import annotations

import msgspec

from shared.messages import ToControl, ToWorker


class ProtocolError(ValueError):
    """A frame that does not decode to the expected message union."""


_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_to_control = msgspec.msgpack.Decoder(ToControl)


def encode(message: ToWorker | ToControl) -> bytes:
    return _encoder.encode(message)


def decode_to_worker(frame: bytes) -> ToWorker:
    try:
        return _to_worker.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad frame for the data plane ({len(frame)} bytes): {exc}") from exc


def decode_to_control(frame: bytes) -> ToControl:
    try:
        return _to_control.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad frame for the control plane ({len(frame)} bytes): {exc}") from exc
