"""Malformed messages and the fuzz check of the filter, shared by tests/test_fuzz.py and bench/fuzz.py."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from ops import kafka_clients
from ops.config import TbaConfig
from ops.names import topic_names
from ops.topics import KafkaSchemaStore, read_topic
from producers.synthetic import BAD_KINDS, synthetic_group
from schemas.codec import HEADER_LEN, MAGIC, Codec, SchemaStore
from schemas.records import DeadLetterCodec, TrajectoryCodec

FOREIGN = {"type": "record", "name": "Foreign", "namespace": "elsewhere", "fields": [{"name": "x", "type": "long"}]}

ROOT = Path(__file__).resolve().parents[1]  # where `python -m tba.cli` runs from


def _varint(n: int) -> bytes:
    """Avro's zig-zag varint."""
    z, out = (n << 1) ^ (n >> 63), bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


class Malformed:
    """Makers of malformed messages, each from a fresh valid encoding: name -> bytes."""

    def __init__(self, store: SchemaStore, max_completion_tokens: int):
        self.codec = TrajectoryCodec(store)
        self.foreign = Codec(FOREIGN, store)
        self.too_long = max_completion_tokens + 1

    def make(self, kind: str, rng: np.random.Generator, index: int) -> bytes:
        group = synthetic_group(rng, index, samples=4, tokens=32)
        if kind in BAD_KINDS:  # valid Avro, invalid content: NaN reward, mismatched lengths, empty completion
            return self.codec.encode(BAD_KINDS[kind](group))
        if kind == "oversize":  # a completion beyond filter.max_completion_tokens
            s = group.samples[0]
            s.token_ids = rng.integers(0, 49152, self.too_long, dtype=np.int32)
            s.logprobs = s.ref_logprobs = -rng.exponential(1.0, self.too_long).astype(np.float32)
            return self.codec.encode(group)
        valid = self.codec.encode(group)
        body = valid[HEADER_LEN:]
        if kind == "truncated":
            return valid[: int(rng.integers(0, len(valid)))]
        if kind == "random_bytes":
            return rng.bytes(int(rng.integers(0, 2048)))
        if kind == "bad_magic":
            return bytes([valid[0] ^ 0xFF]) + valid[1:]
        if kind == "unknown_fingerprint":
            return MAGIC + rng.bytes(8) + body
        if kind == "foreign_schema":
            return self.foreign.encode({"x": int(rng.integers(0, 2**62))})
        if kind == "negative_length":  # group_id's length made negative
            return valid[:HEADER_LEN] + _varint(-int(rng.integers(1, 2**31))) + body[1:]
        if kind == "huge_length":  # group_id's length beyond any message
            return valid[:HEADER_LEN] + _varint(int(rng.integers(2**31, 2**62))) + body[1:]
        if kind == "invalid_utf8":  # group_id's 36 characters replaced by bytes that are not UTF-8
            return valid[:HEADER_LEN] + body[:1] + b"\xff\xfe" * 18 + body[37:]
        if kind == "trailing_garbage":
            return valid + rng.bytes(int(rng.integers(1, 64)))
        raise ValueError(kind)


KINDS = ["truncated", "random_bytes", "bad_magic", "unknown_fingerprint", "foreign_schema", "negative_length",
         "huge_length", "invalid_utf8", "trailing_garbage", "oversize", *BAD_KINDS]  # fmt: skip


def fuzz(cfg: TbaConfig, malformed: int, valid: int, seed: int = 0, timeout_s: float = 600) -> dict:
    """Send malformed and valid messages interleaved (keys say which), run one filter process to the end."""
    rng = np.random.default_rng(seed)
    store = KafkaSchemaStore(cfg)
    makers = Malformed(store, cfg.filter.max_completion_tokens)
    codec = TrajectoryCodec(store)
    names = topic_names(cfg)
    order = rng.permutation(malformed + valid)  # < malformed: a malformed message, else a valid group
    kinds = Counter()
    producer = kafka_clients.producer(cfg)
    for i in order.tolist():
        if i < malformed:
            kind = KINDS[i % len(KINDS)]
            kinds[kind] += 1
            key, value = f"bad-{i}-{kind}", makers.make(kind, rng, i)
        else:
            key, value = f"good-{i}", codec.encode(synthetic_group(rng, i, samples=4, tokens=32))
        producer.send(names.raw, key=key.encode(), value=value)
    producer.flush()
    producer.close()

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tba.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "tba.cli", "--config", str(config), "filter", "--idle-exit", "5"],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        seconds = time.monotonic() - started
    curated = Counter(r.key.decode() for r in read_topic(cfg, names.curated))
    letters = DeadLetterCodec(store)
    dlq, reasons = Counter(), Counter()
    for r in read_topic(cfg, names.dlq):
        letter = letters.decode(r.value)
        dlq[r.key.decode()] += 1
        reasons[letter.scorer] += 1
        if not letter.reason:
            raise AssertionError(f"a dead letter without a reason: {r.key}")
    bad_keys = {k for k in dlq if k.startswith("bad-")}
    return {
        "fuzzed": malformed,
        "valid": valid,
        "kinds": dict(kinds),
        "in_dlq": len(bad_keys),
        "malformed_in_curated": sum(1 for k in curated if k.startswith("bad-")),
        "valid_in_curated": sum(1 for k in curated if k.startswith("good-")),
        "valid_in_dlq": sum(1 for k in dlq if k.startswith("good-")),
        "duplicates": sum(n - 1 for n in (curated + dlq).values() if n > 1),
        "dlq_by_scorer": dict(reasons),
        "crashes": int(proc.returncode != 0),
        "filter_exit": proc.returncode,
        "filter_stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
        "filter_seconds": seconds,
    }
