"""The one place Kafka clients are configured: every producer, consumer and admin client comes from here."""

from __future__ import annotations

from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from ops.config import TbaConfig


def _common(cfg: TbaConfig) -> dict[str, Any]:
    return {
        "bootstrap_servers": cfg.kafka.bootstrap.split(","),
        "request_timeout_ms": int(cfg.kafka.client_timeout_s * 1000),
    }


def producer(cfg: TbaConfig, **overrides: Any) -> KafkaProducer:
    """Idempotent, acks=all, compressed; sized for the topics' max message size."""
    compression = cfg.topics.compression
    settings = {
        **_common(cfg),
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": None if compression == "none" else compression,
        "max_request_size": cfg.kafka.max_message_bytes,
        # measured on 2 cores (bench/dataplane.py): 1 MiB batches with 10 ms linger send ~30% more
        # 8 KiB groups per second than 256 KiB / 5 ms; a transaction commit flushes without waiting
        "linger_ms": 10,
        "batch_size": 1024 * 1024,
        "max_block_ms": int(cfg.kafka.client_timeout_s * 1000),
        "delivery_timeout_ms": int(cfg.kafka.client_timeout_s * 1000) + 5000,
    }
    settings.update(overrides)
    return KafkaProducer(**settings)


def consumer(cfg: TbaConfig, *topics: str, **overrides: Any) -> KafkaConsumer:
    """Reads committed records only (the filter writes transactionally), commits by hand."""
    settings = {
        **_common(cfg),
        "isolation_level": "read_committed",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": cfg.kafka.max_message_bytes,
        "fetch_max_bytes": max(cfg.kafka.max_message_bytes, 52428800),
        "fetch_max_wait_ms": 50,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 1_000,
    }
    settings.update(overrides)
    return KafkaConsumer(*topics, **settings)


def admin(cfg: TbaConfig, **overrides: Any) -> KafkaAdminClient:
    settings = {**_common(cfg), **overrides}
    return KafkaAdminClient(**settings)
