"""A policy version on the wire: one flat byte buffer of every tensor, its checksums, and the chunking.

WeightVersion holds the weights as one contiguous uint8 buffer with a table of (name, dtype, shape,
offset); state_dict() gives zero-copy tensor views of it. encode() turns a version into its wire
form (full, or per-tensor deltas against a base the receiver holds: unchanged, or zstd of the XOR
of the bytes - after a small optimizer step most bf16 words do not change at all), chunks() cuts
that into <= chunk_bytes Chunks, and VersionAssembler turns Chunks back into a verified WeightVersion.
"""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash
import zstandard

from schemas import weight_sync_pb2 as pb
from schemas.buffers import allocate
from schemas.chunk_wire import DataChunk, data_chunk
from schemas.errors import TbaError

Encoding = pb.TensorMeta.Encoding


class ChecksumError(TbaError):
    """The reassembled weights do not match the version's checksum (xxh3-128 or sha256, as its header says)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without "torch."
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class WeightVersion:
    version: int
    step: int
    wall_time: float
    model_id: str
    tensors: tuple[TensorSpec, ...]
    buffer: np.ndarray  # (total_bytes,) uint8, never written after the version is sealed
    known_digests: tuple[bytes, ...] | None = None  # when the sender's were checked on arrival
    known_xxh3: bytes | None = None  # likewise
    _hashing: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def digests(self) -> tuple[bytes, ...]:
        """sha256 of each tensor's bytes, computed once, on first need (the stream path, announcements):
        a version shared through memory on its own host is released before it is hashed."""
        with self._hashing:
            if self.known_digests is None:
                object.__setattr__(self, "known_digests", _digests(self.tensors, self.buffer))
        return self.known_digests

    @property
    def xxh3(self) -> bytes:
        """xxh3-128 of the whole buffer (every tensor back to back), computed once, on first need."""
        with self._hashing:
            if self.known_xxh3 is None:
                object.__setattr__(self, "known_xxh3", fingerprint(self.buffer))
        return self.known_xxh3

    @property
    def sha256(self) -> bytes:
        """The version's checksum: sha256 over the tensors' sha256s, in order."""
        return version_digest(self.digests)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.size)

    @property
    def dtype(self) -> str:
        return ",".join(sorted({t.dtype for t in self.tensors}))

    def tensor_bytes(self, spec: TensorSpec) -> np.ndarray:
        return self.buffer[spec.offset : spec.offset + spec.nbytes]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors viewing this version's buffer (no copy); treat them as read-only."""
        with warnings.catch_warnings():  # torch warns about read-only arrays; the views are read-only by contract
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(self.buffer)
        return {
            t.name: flat[t.offset : t.offset + t.nbytes].view(getattr(torch, t.dtype)).view(t.shape)
            for t in self.tensors
        }


def unaliased(state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, detached tensor) of each distinct tensor: one that aliases an earlier one (lm_head tied to
    the embeddings) is left out, its first name kept."""
    seen = set()
    for name, tensor in state_dict.items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            yield name, t


def layout(state_dict: dict[str, torch.Tensor]) -> tuple[tuple[TensorSpec, ...], list[torch.Tensor]]:
    """Where each tensor goes in a version's flat buffer (back to back), and the tensors as flat bytes.

    Tensors that alias one another (tied embeddings) are sent once, under the first name.
    """
    specs, tensors, offset = [], [], 0
    for name, t in unaliased(state_dict):
        nbytes = t.numel() * t.element_size()
        specs.append(TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
        tensors.append(t.contiguous().reshape(-1).view(torch.uint8))
        offset += nbytes
    return tuple(specs), tensors


def stage(state_dict: dict[str, torch.Tensor]) -> tuple[tuple[TensorSpec, ...], np.ndarray]:
    """Copy a state dict into one (pooled) staging buffer: the only work a publish does on the caller's time."""
    specs, tensors = layout(state_dict)
    buffer = allocate(sum(t.nbytes for t in specs))
    fill(buffer, specs, tensors)
    return specs, buffer


def fill(buffer: np.ndarray, specs, tensors) -> None:
    """Copy laid-out tensors into a buffer of their total size."""
    flat = torch.from_numpy(buffer)
    for spec, t in zip(specs, tensors, strict=True):
        flat[spec.offset : spec.offset + spec.nbytes].copy_(t)


def tensor_digest(data: np.ndarray) -> bytes:
    return hashlib.sha256(memoryview(data)).digest()


def version_digest(digests) -> bytes:
    # A hash of per-tensor hashes: tensors hash in parallel when sealing, and as each one arrives
    # when receiving, instead of one sequential pass over every byte at the end.
    return hashlib.sha256(b"".join(digests)).digest()


_HASHERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256")  # hashlib releases the GIL


def fingerprint(buffer: np.ndarray) -> bytes:
    """xxh3-128 of every byte: checks a shared-memory mapping at ~6 GB/s a core (sha256: ~0.8)."""
    return xxhash.xxh3_128(memoryview(buffer)).digest()


def seal(specs, buffer: np.ndarray, version: int, step: int, model_id: str = "", wall_time: float | None = None):
    """A staged buffer as a WeightVersion, read-only from here on (hashed when first needed)."""
    buffer.flags.writeable = False
    return WeightVersion(version, step, wall_time or time.time(), model_id, tuple(specs), buffer)


def _digests(specs, buffer: np.ndarray) -> tuple[bytes, ...]:
    """Each tensor's sha256, two at a time."""
    return tuple(_HASHERS.map(lambda t: tensor_digest(buffer[t.offset : t.offset + t.nbytes]), specs))


@dataclass(frozen=True)
class EncodedVersion:
    """What goes on the wire for one (version, base) pair; computed once and shared by subscribers."""

    header: pb.VersionHeader
    payloads: tuple[memoryview | bytes, ...]  # per tensor


def encode(
    version: WeightVersion, base: WeightVersion | None = None, zstd_level: int = 1, checksum: str = "sha256"
) -> EncodedVersion:
    """Full encoding, or per-tensor deltas against base where that is smaller; the header carries the
    checksum named (sha256 or xxh3)."""
    base_specs = {t.name: t for t in base.tensors} if base is not None else {}
    compressor = zstandard.ZstdCompressor(level=zstd_level)
    metas, payloads = [], []
    raw = memoryview(version.buffer)
    for spec in version.tensors:
        data = version.tensor_bytes(spec)
        encoding, payload = Encoding.RAW, raw[spec.offset : spec.offset + spec.nbytes]
        old = base_specs.get(spec.name)
        if old is not None and (old.dtype, old.shape) == (spec.dtype, spec.shape):
            before = base.tensor_bytes(old)
            if np.array_equal(data, before):
                encoding, payload = Encoding.UNCHANGED, b""
            else:
                packed = compressor.compress(np.bitwise_xor(data, before).tobytes())
                if len(packed) < spec.nbytes:
                    encoding, payload = Encoding.XOR_ZSTD, packed
        metas.append(
            pb.TensorMeta(
                name=spec.name,
                dtype=spec.dtype,
                shape=spec.shape,
                nbytes=spec.nbytes,
                encoding=encoding,
                wire_nbytes=len(payload),
            )
        )
        payloads.append(payload)
    return EncodedVersion(version_header(version, metas, base, checksum), tuple(payloads))


def version_header(version: WeightVersion, metas=None, base=None, checksum: str = "") -> pb.VersionHeader:
    """The header of a version: every tensor RAW unless metas say otherwise; a checksum (sha256 or xxh3)
    only if asked (it hashes the whole version the first time)."""
    if metas is None:
        metas = [pb.TensorMeta(name=t.name, dtype=t.dtype, shape=t.shape, nbytes=t.nbytes) for t in version.tensors]
    return pb.VersionHeader(
        version=version.version,
        step=version.step,
        wall_time=version.wall_time,
        model_id=version.model_id,
        dtype=version.dtype,
        sha256=version.sha256 if checksum == "sha256" else b"",
        xxh3=version.xxh3 if checksum == "xxh3" else b"",
        tensors=metas,
        base_version=base.version if base is not None else -1,
    )


def chunks(encoded: EncodedVersion, chunk_bytes: int) -> Iterator[pb.Chunk | bytes]:
    """The header chunk, then each tensor's payload in slices of at most chunk_bytes, serialized
    (chunk_wire.serialize passes them through)."""
    yield pb.Chunk(header=encoded.header)
    for i, payload in enumerate(encoded.payloads):
        for start in range(0, len(payload), chunk_bytes):
            yield data_chunk(i, start, payload[start : start + chunk_bytes])


def header_specs(header: pb.VersionHeader) -> tuple[TensorSpec, ...]:
    """Where each tensor of a header lies in the version's flat buffer: back to back, in header order."""
    specs, offset = [], 0
    for meta in header.tensors:
        specs.append(TensorSpec(meta.name, meta.dtype, tuple(meta.shape), offset, meta.nbytes))
        offset += meta.nbytes
    return tuple(specs)


def verified_mapping(header: pb.VersionHeader, buffer: np.ndarray, xxh3: bytes) -> WeightVersion:
    """A version whose bytes are all there already (a shared-memory mapping), if their xxh3-128 matches."""
    if fingerprint(buffer) != xxh3:
        raise ChecksumError(f"version {header.version}: shared-memory bytes do not match their xxh3, rejecting it")
    h = header
    return WeightVersion(h.version, h.step, h.wall_time, h.model_id, header_specs(header), buffer, known_xxh3=xxh3)


class VersionAssembler:
    """Chunks of one version -> a verified WeightVersion, written straight into its final buffer.

    With an xxh3 checksum, bytes are hashed as they land, in header order, so finish() has nothing
    left to read; checksum_after_data: the xxh3 comes in a last chunk, not in the header.
    """

    def __init__(self, header: pb.VersionHeader, base: WeightVersion | None, checksum_after_data: bool = False):
        if header.base_version >= 0 and (base is None or base.version != header.base_version):
            raise TbaError(f"delta against version {header.base_version}, which this receiver does not hold")
        if not (header.sha256 or header.xxh3 or checksum_after_data):
            raise TbaError(f"version {header.version}: its header carries no checksum (sha256 or xxh3)")
        self.header = header
        self.base = base
        self.by_sha256 = bool(header.sha256)  # else xxh3, from the header or from the last chunk
        self.xxh3 = header.xxh3 or None
        self._awaits_checksum = not (header.sha256 or header.xxh3)
        self.specs = specs = header_specs(header)
        self.buffer = allocate(sum(t.nbytes for t in specs))
        self._pending: dict[int, bytearray] = {}  # compressed deltas being received
        self._received = [0] * len(specs)  # wire bytes of each tensor so far
        self._ready = [0] * len(specs)  # bytes of each tensor in place, from its start
        self._digests: list = [None] * len(specs)  # bytes, or a Future of them while a tensor hashes
        self._hasher = None if self.by_sha256 else xxhash.xxh3_128()
        self._hashed = (0, 0)  # (tensor, bytes of it) fed to the hasher so far
        self._remaining = sum(1 for m in header.tensors if m.wire_nbytes > 0)
        base_specs = {t.name: t for t in base.tensors} if base is not None else {}
        base_index = {t.name: j for j, t in enumerate(base.tensors)} if base is not None else {}
        for i, meta in enumerate(header.tensors):
            if meta.encoding == Encoding.UNCHANGED:
                self._slot(i)[:] = base.tensor_bytes(base_specs[meta.name])
                self._ready[i] = meta.nbytes
                if self.by_sha256:
                    self._digests[i] = base.digests[base_index[meta.name]]
            elif meta.wire_nbytes == 0 and meta.nbytes > 0:
                raise TbaError(f"tensor {meta.name}: no bytes announced for a non-empty tensor")
            elif meta.nbytes == 0 and self.by_sha256:
                self._digests[i] = tensor_digest(self._slot(i))
        self._base_specs = base_specs
        self._hash_ready()

    def _slot(self, i: int) -> np.ndarray:
        spec = self.specs[i]
        return self.buffer[spec.offset : spec.offset + spec.nbytes]

    @property
    def done(self) -> bool:
        return self._remaining == 0 and not self._awaits_checksum

    def add(self, chunk: DataChunk | pb.Chunk) -> int:
        """Place one data chunk (or take the checksum that follows the data); returns its size on the wire."""
        if isinstance(chunk, pb.Chunk) and chunk.xxh3:
            if not self._awaits_checksum or self._remaining:
                raise TbaError(f"version {self.header.version}: a checksum chunk before the data's end or unasked")
            self.xxh3, self._awaits_checksum = chunk.xxh3, False
            return 0
        i, meta = chunk.tensor, self.header.tensors[chunk.tensor]
        data = chunk.data  # a protobuf message copies a bytes field at each access: once only
        end = chunk.offset + len(data)
        if end > meta.wire_nbytes or chunk.offset != self._received[i]:
            raise TbaError(f"tensor {meta.name}: chunk at {chunk.offset} out of order or beyond its size")
        if meta.encoding == Encoding.RAW:
            start = self.specs[i].offset + chunk.offset
            self.buffer[start : start + len(data)] = np.frombuffer(data, np.uint8)
            self._ready[i] = end
        else:
            self._pending.setdefault(i, bytearray()).extend(data)
        self._received[i] = end
        if end == meta.wire_nbytes:
            if meta.encoding == Encoding.XOR_ZSTD:
                xor = zstandard.ZstdDecompressor().decompress(bytes(self._pending.pop(i)), max_output_size=meta.nbytes)
                before = self.base.tensor_bytes(self._base_specs[meta.name])
                np.bitwise_xor(before, np.frombuffer(xor, np.uint8), out=self._slot(i))
            if self.by_sha256:  # hashed on another thread while the next chunks arrive (hashlib releases the GIL)
                self._digests[i] = _HASHERS.submit(tensor_digest, self._slot(i))
            self._ready[i] = meta.nbytes
            self._remaining -= 1
        self._hash_ready()
        return len(data)

    def _hash_ready(self) -> None:
        """Feed the xxh3 every byte that is in place, in header order (a RAW tensor as its chunks land)."""
        if self._hasher is None:
            return
        i, done = self._hashed
        while i < len(self.specs):
            spec = self.specs[i]
            if self._ready[i] > done:
                self._hasher.update(memoryview(self.buffer[spec.offset + done : spec.offset + self._ready[i]]))
                done = self._ready[i]
            if done < spec.nbytes:
                break
            i, done = i + 1, 0
        self._hashed = (i, done)

    def finish(self) -> WeightVersion:
        """The version, if its checksum matches; ChecksumError otherwise."""
        h = self.header
        if self.by_sha256:
            digests = tuple(d if isinstance(d, bytes) else d.result() for d in self._digests)
            checked, known = version_digest(digests) == h.sha256, {"known_digests": digests}
        else:
            checked, known = self._hasher.digest() == self.xxh3, {"known_xxh3": self.xxh3}
        if not checked:
            raise ChecksumError(f"version {h.version}: {'sha256' if self.by_sha256 else 'xxh3'} mismatch, rejecting it")
        self.buffer.flags.writeable = False
        return WeightVersion(h.version, h.step, h.wall_time, h.model_id, self.specs, self.buffer, **known)
