"""The one codec: Avro single-object encoding, writer schemas resolved through a compacted topic; and Confluent's.

A message is 0xC3 0x01, the 8-byte CRC-64-AVRO fingerprint of the writer schema's canonical form
(little-endian), then the Avro binary body. A reader looks the fingerprint up in the SchemaStore
(local cache, then the shared store: on Kafka the `<ns>.schemas` topic, ops/topics.py: KafkaSchemaStore) and
always reads with its own reader schema, so writers and readers evolve independently under Avro's
resolution rules. Readers also take Confluent's framing, what most Avro on Kafka is: 0x00, a 4-byte big-endian
schema id, the body; the store asks a schema registry for the id (KafkaSchemaStore.by_id). The first byte tells
the two apart. Nothing here does I/O.
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

from schemas.errors import DecodeError, TbaError

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_HEADER_LEN = 5
SCHEMA_DIR = Path(__file__).parent


@cache
def load_schema(name: str) -> dict:
    """A schema file of schemas/ by stem, e.g. load_schema("trajectory_group")."""
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


def schema_fingerprint(schema: dict) -> bytes:
    """The 8 bytes single-object encoding puts in front of the body."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(fastavro.parse_schema(schema)), "CRC-64-AVRO"))


class SchemaStore:
    """Writer schemas by fingerprint, in memory. ops.topics.KafkaSchemaStore shares them through the
    namespace's schemas topic (publish and fetch below); this one is for a process on its own."""

    def __init__(self):
        self._schemas: dict[bytes, Any] = {}
        self._published: set[bytes] = set()
        self._lock = threading.Lock()

    def register(self, schema: dict) -> bytes:
        """Make schema known to every reader (published once per process); returns its fingerprint."""
        fp = schema_fingerprint(schema)
        parsed = fastavro.parse_schema(schema)
        with self._lock:
            self._schemas.setdefault(fp, parsed)
            if fp in self._published:
                return fp
        self.publish(fp, to_parsing_canonical_form(parsed))
        with self._lock:
            self._published.add(fp)
        return fp

    def lookup(self, fp: bytes):
        """The parsed writer schema of fp; fetches the shared schemas once more if fp is new here."""
        schema = self._schemas.get(fp)
        if schema is None:
            for key, canonical in self.fetch():
                # every writer may write the store: trust a key only when it is the CRC-64-AVRO of the text
                # as registered, which is what that writer put in its messages. Not re-derived here: Avro
                # libraries disagree on canonical forms (Apache's keeps {"type": "long"} for a logical type)
                if bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")) != key:
                    continue
                try:
                    parsed = fastavro.parse_schema(json.loads(canonical))
                except (ValueError, fastavro.schema.SchemaParseException):
                    continue  # not a schema: nothing to read with
                with self._lock:
                    self._schemas.setdefault(key, parsed)
            schema = self._schemas.get(fp)
        if schema is None:
            raise DecodeError(f"unknown writer schema fingerprint {fp.hex()} (not in the schema store)")
        return schema

    def by_id(self, schema_id: int):
        """The parsed writer schema of a Confluent-framed record: its schema registry's, DecodeError if none has it."""
        raise DecodeError(f"Confluent-framed record (schema id {schema_id}) and no schema registry to resolve it in")

    def registered_id(self, subject: str, schema: dict) -> int:
        """The id of schema registered under subject in the schema registry (Confluent's writers)."""
        raise TbaError("writing Confluent's framing needs a schema registry (kafka.schema_registry_url)")

    def publish(self, fp: bytes, canonical: str) -> None:
        """Share a writer schema with other processes (in memory: nobody else to tell)."""

    def fetch(self) -> list[tuple[bytes, str]]:
        """(fingerprint, canonical form) of every shared writer schema (in memory: none beyond this process)."""
        return []


class Codec:
    """Encodes with one writer schema and decodes anything the store knows into one reader schema."""

    def __init__(self, schema: dict, store: SchemaStore):
        self.source, self.schema = schema, fastavro.parse_schema(schema)
        self.store = store
        self.fingerprint = store.register(schema)
        self.schema_id: int | None = None  # in the schema registry, once writing Confluent's framing
        self._header = MAGIC + self.fingerprint

    def write_confluent(self, subject: str) -> None:
        """Write Confluent's framing from now on, the schema registered under subject (`<topic>-value`)."""
        self.schema_id = self.store.registered_id(subject, self.source)
        self._header = CONFLUENT_MAGIC + self.schema_id.to_bytes(4, "big")

    def encode(self, record: dict) -> bytes:
        buf = io.BytesIO()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self.schema, record)
        return buf.getvalue()

    def writer_of(self, data: bytes) -> tuple[Any, int]:
        """The writer schema of a message and where its body starts."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) < CONFLUENT_HEADER_LEN:
            raise DecodeError(f"too short for an Avro record ({len(data or b'')} bytes)")
        if data[:1] == CONFLUENT_MAGIC:
            schema_id = int.from_bytes(data[1:CONFLUENT_HEADER_LEN], "big")
            writer = self.schema if schema_id == self.schema_id else self.store.by_id(schema_id)
            return writer, CONFLUENT_HEADER_LEN
        if data[:2] != MAGIC:
            raise DecodeError(f"neither Avro single-object encoding nor Confluent's framing (first bytes "
                              f"{bytes(data[:2]).hex()})")  # fmt: skip
        if len(data) < HEADER_LEN:
            raise DecodeError(f"too short for Avro single-object encoding ({len(data)} bytes)")
        fp = bytes(data[2:HEADER_LEN])
        return (self.schema if fp == self.fingerprint else self.store.lookup(fp)), HEADER_LEN

    def decode(self, data: bytes) -> dict:
        """The record in this codec's reader schema; DecodeError with a reason otherwise."""
        writer, start = self.writer_of(data)
        buf = io.BytesIO(data)
        buf.seek(start)
        try:
            if writer is self.schema:
                record = fastavro.schemaless_reader(buf, writer, None)
            else:
                record = fastavro.schemaless_reader(buf, writer, self.schema)
        except fastavro.read.SchemaResolutionError as exc:
            name = writer.get("name", writer.get("type")) if isinstance(writer, dict) else writer
            named = (
                f"schema id {int.from_bytes(data[1:CONFLUENT_HEADER_LEN], 'big')}"
                if start == CONFLUENT_HEADER_LEN
                else f"schema {bytes(data[2:HEADER_LEN]).hex()}"
            )  # named only when it fails: decode is the hot path
            raise DecodeError(
                f"writer {named} ({name}) cannot be read as {self.schema['name']}: {str(exc)[:120]}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise DecodeError(f"invalid UTF-8 in a string field: {exc}") from exc
        except (EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError, MemoryError) as exc:
            raise DecodeError(f"corrupt Avro body: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after the Avro body")
        return record
