"""Data chunks framed by hand read and write exactly the bytes protobuf does, both ways."""

import pytest
from google.protobuf.message import DecodeError

from schemas import weight_sync_pb2 as pb
from schemas.chunk_wire import DataChunk, data_chunk, parse, serialize

CASES = [(0, 0, b""), (0, 0, b"x"), (3, 0, b"abc"), (0, 1 << 20, bytes(range(256)) * 4), (127, 128, b"\0" * 300),
         (2**31 - 1, 2**40 + 5, b"tail")]  # fmt: skip


@pytest.mark.parametrize("tensor,offset,data", CASES)
def test_a_framed_data_chunk_is_protobufs_own_encoding(tensor, offset, data):
    framed = data_chunk(tensor, offset, memoryview(data))
    assert framed == pb.Chunk(tensor=tensor, offset=offset, data=data).SerializeToString()
    got = parse(framed)
    assert isinstance(got, DataChunk) and (got.tensor, got.offset, bytes(got.data)) == (tensor, offset, data)


def test_every_other_message_is_read_by_protobuf():
    header = pb.Chunk(header=pb.VersionHeader(version=4, model_id="m"))
    checksum = pb.Chunk(xxh3=b"\1" * 16)
    unknown_field = pb.Chunk(tensor=1, data=b"ab", shared_memory_path="/dev/shm/x")
    for message in (header, checksum, unknown_field):
        got = parse(serialize(message))
        assert isinstance(got, pb.Chunk) and got == message
    reordered = pb.Chunk(data=b"zz").SerializeToString() + pb.Chunk(tensor=2).SerializeToString()
    assert (lambda c: (c.tensor, bytes(c.data)))(parse(reordered)) == (2, b"zz")
    negative = pb.Chunk(tensor=-1, data=b"q").SerializeToString()  # read as protobuf reads it
    assert parse(negative) == pb.Chunk(tensor=-1, data=b"q")
    with pytest.raises(DecodeError):  # truncated: protobuf's own error, nothing half-read
        parse(data_chunk(1, 2, b"abcdef")[:-2])
