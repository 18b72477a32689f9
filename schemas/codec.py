"""The one codec: Avro single-object encoding, writer schemas resolved through a compacted topic.

A message is 0xC3 0x01, the 8-byte CRC-64-AVRO fingerprint of the writer schema's canonical form
(little-endian), then the Avro binary body. A reader looks the fingerprint up in the SchemaStore
(local cache, then the `<ns>.schemas` topic) and always reads with its own reader schema, so
writers and readers evolve independently under Avro's resolution rules.
"""

from __future__ import annotations

import io
import json
import threading
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from ops.errors import DecodeError

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
SCHEMA_DIR = Path(__file__).parent


@cache
def load_schema(name: str) -> dict:
    """A schema file of schemas/ by stem, e.g. load_schema("trajectory_group")."""
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


def schema_fingerprint(schema: dict) -> bytes:
    """The 8 bytes single-object encoding puts in front of the body."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(fastavro.parse_schema(schema)), "CRC-64-AVRO"))


class SchemaStore:
    """Writer schemas by fingerprint: a local cache in front of the compacted schemas topic."""

    def __init__(self, cfg=None):
        self._cfg = cfg
        self._schemas: dict[bytes, Any] = {}
        self._registered: set[bytes] = set()
        self._lock = threading.Lock()

    def _topic(self) -> str:
        from ops.topics import topic_names

        return topic_names(self._cfg).schemas

    def register(self, schema: dict) -> bytes:
        """Make schema known to every reader (publishes it once per process); returns its fingerprint."""
        fp = schema_fingerprint(schema)
        with self._lock:
            self._schemas.setdefault(fp, fastavro.parse_schema(schema))
            if fp in self._registered or self._cfg is None:
                return fp
        from kafka.errors import KafkaTimeoutError

        from ops import kafka_clients
        from ops.errors import TbaError

        canonical = to_parsing_canonical_form(fastavro.parse_schema(schema))
        producer = kafka_clients.producer(self._cfg, compression_type=None, linger_ms=0)
        timeout = self._cfg.kafka.client_timeout_s
        try:
            producer.send(self._topic(), key=fp.hex().encode(), value=canonical.encode()).get(timeout=timeout)
        except KafkaTimeoutError as exc:  # the broker answers, but not for this topic: it was never created
            raise TbaError(
                f"could not publish a schema to {self._topic()} within {timeout:.0f}s: "
                f"were the namespace's topics created (`tba topics create`)?"
            ) from exc
        finally:
            producer.close()
        with self._lock:
            self._registered.add(fp)
        return fp

    def lookup(self, fp: bytes):
        """The parsed writer schema of fp; reads the schemas topic once more if fp is new here."""
        schema = self._schemas.get(fp)
        if schema is None and self._cfg is not None:
            self._refresh()
            schema = self._schemas.get(fp)
        if schema is None:
            raise DecodeError(f"unknown writer schema fingerprint {fp.hex()} (not in the schema store)")
        return schema

    def _refresh(self) -> None:
        from ops.topics import read_topic

        for rec in read_topic(self._cfg, self._topic(), isolation="read_uncommitted"):
            try:
                parsed = fastavro.parse_schema(json.loads(rec.value))
            except (ValueError, fastavro.schema.SchemaParseException):
                continue  # a foreign value in the store is not ours to trust
            with self._lock:
                self._schemas.setdefault(bytes.fromhex(rec.key.decode()), parsed)


class Codec:
    """Encodes with one writer schema and decodes anything the store knows into one reader schema."""

    def __init__(self, schema: dict, store: SchemaStore):
        self.schema = fastavro.parse_schema(schema)
        self.store = store
        self.fingerprint = store.register(schema)
        self._header = MAGIC + self.fingerprint

    def encode(self, record: dict) -> bytes:
        buf = io.BytesIO()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self.schema, record)
        return buf.getvalue()

    def decode(self, data: bytes) -> dict:
        """The record in this codec's reader schema; DecodeError with a reason otherwise."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) < HEADER_LEN:
            raise DecodeError(f"too short for Avro single-object encoding ({len(data or b'')} bytes)")
        if data[:2] != MAGIC:
            raise DecodeError(f"not Avro single-object encoding (magic {bytes(data[:2]).hex()})")
        fp = bytes(data[2:HEADER_LEN])
        writer = self.schema if fp == self.fingerprint else self.store.lookup(fp)
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            if writer is self.schema:
                record = fastavro.schemaless_reader(buf, writer, None)
            else:
                record = fastavro.schemaless_reader(buf, writer, self.schema)
        except fastavro.read.SchemaResolutionError as exc:
            name = writer.get("name", writer.get("type")) if isinstance(writer, dict) else writer
            raise DecodeError(
                f"writer schema {fp.hex()} ({name}) cannot be read as {self.schema['name']}: {str(exc)[:120]}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise DecodeError(f"invalid UTF-8 in a string field: {exc}") from exc
        except (EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError, MemoryError) as exc:
            raise DecodeError(f"corrupt Avro body: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after the Avro body")
        return record
