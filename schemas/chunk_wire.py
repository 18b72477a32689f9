"""A data Chunk's protobuf encoding, written with one copy of its bytes and read with none.

Nearly every byte of a version travels in Chunks that set only tensor, offset and data (fields 2, 3
and 4 of schemas/weight_sync.proto). Building one through the protobuf runtime copies the data
three times (into bytes, into the message, into the serialized string) and reading one twice more;
at a few hundred MB a version that is most of the stream's time. So data chunks are framed here,
byte for byte as protobuf frames them (varint tags and lengths, zero fields left out), and any other
message (a header, a checksum, a chunk with fields this file does not know) goes through protobuf.
Either way the wire is the .proto's: clients built from it alone read and write the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from schemas import weight_sync_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["WeightSync"].full_name
_TENSOR, _OFFSET, _DATA = 0x10, 0x18, 0x22  # (field number << 3) | wire type: 0 varint, 2 length-delimited


@dataclass(frozen=True)
class DataChunk:
    """A Chunk that carries bytes of one tensor: data is a view into the received message."""

    tensor: int
    offset: int
    data: memoryview | bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def data_chunk(tensor: int, offset: int, data) -> bytes:
    """The serialized Chunk(tensor=tensor, offset=offset, data=data): one copy of data."""
    head = bytearray()
    for tag, value in ((_TENSOR, tensor), (_OFFSET, offset)):
        if value:  # proto3 leaves zero scalars out
            head += bytes([tag]) + _varint(value)
    if len(data):
        head += bytes([_DATA]) + _varint(len(data))
    return b"".join((head, data))


def serialize(chunk: pb.Chunk | bytes) -> bytes:
    """A message for the wire: Chunks from data_chunk() are already serialized."""
    return chunk if isinstance(chunk, bytes) else chunk.SerializeToString()


def parse(message: bytes) -> pb.Chunk | DataChunk:
    """A received Chunk: a DataChunk viewing message when it holds only tensor, offset and data."""
    fields, view, at = {}, memoryview(message), 0
    while at < len(message):
        tag = message[at]
        if tag not in (_TENSOR, _OFFSET, _DATA) or tag in fields:
            return pb.Chunk.FromString(message)
        value, at = _read_varint(message, at + 1)
        if value is None:
            return pb.Chunk.FromString(message)  # protobuf says what is wrong with it
        if tag == _DATA:
            if at + value > len(message):
                return pb.Chunk.FromString(message)
            fields[tag], at = view[at : at + value], at + value
        else:
            fields[tag] = value
    tensor, offset = fields.get(_TENSOR, 0), fields.get(_OFFSET, 0)
    if tensor >= 1 << 31 or offset >= 1 << 63:  # negative on the wire: protobuf's reading applies
        return pb.Chunk.FromString(message)
    return DataChunk(tensor, offset, fields.get(_DATA, b""))


def _read_varint(message: bytes, at: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while at < len(message) and shift < 64:
        byte = message[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
    return None, at


def add_servicer(servicer, server: grpc.Server) -> None:
    """Serve a WeightSyncServicer's calls with data chunks framed here (the generated
    add_WeightSyncServicer_to_server would pass each one through protobuf)."""
    handlers = {
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            servicer.Subscribe, request_deserializer=pb.SubscribeRequest.FromString, response_serializer=serialize
        ),
        "Publish": grpc.stream_unary_rpc_method_handler(
            servicer.Publish, request_deserializer=parse, response_serializer=pb.PublishReply.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class WeightSyncStub:
    """The generated stub's two calls, with data chunks framed here."""

    def __init__(self, channel: grpc.Channel):
        self.Subscribe = channel.unary_stream(
            f"/{SERVICE}/Subscribe",
            request_serializer=pb.SubscribeRequest.SerializeToString,
            response_deserializer=parse,
        )
        self.Publish = channel.stream_unary(
            f"/{SERVICE}/Publish", request_serializer=serialize, response_deserializer=pb.PublishReply.FromString
        )
