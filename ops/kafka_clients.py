"""The one place Kafka clients are configured: every producer, consumer and admin client comes from here."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaTimeoutError, SaslAuthenticationFailedError

import ops.kafka_group_join  # noqa: F401  (every group member takes the outcome of each rebalance it joins)
from ops.config import TbaConfig
from ops.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)
# How long a stopping role waits on Kafka for each client it closes. Kafka answering, a close takes
# milliseconds; away, waiting the client timeout (and a producer's close waits forever by default)
# would outlast the supervisor's stop timeout and end in a SIGKILL.
CLOSE_TIMEOUT_S = 5.0


def _common(cfg: TbaConfig) -> dict[str, Any]:
    k = cfg.kafka
    settings: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap.split(","),
        "request_timeout_ms": int(k.client_timeout_s * 1000),
        "bootstrap_timeout_ms": int(k.client_timeout_s * 1000),
        "security_protocol": k.security_protocol,
    }
    if k.security_protocol.startswith("SASL"):
        if not k.sasl_username:
            raise ConfigError(f"kafka.sasl_username: required with kafka.security_protocol {k.security_protocol}")
        settings.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                        sasl_plain_password=kafka_password(cfg))  # fmt: skip
    if k.security_protocol.endswith("SSL"):
        files = {"ssl_cafile": k.ssl_cafile, "ssl_certfile": k.ssl_certfile, "ssl_keyfile": k.ssl_keyfile}
        settings.update({name: str(path) for name, path in files.items() if path is not None})
    return settings


def kafka_password(cfg: TbaConfig) -> str:
    """The SASL password, from kafka.sasl_password_file or the variable kafka.sasl_password_env (never logged)."""
    k = cfg.kafka
    if k.sasl_password_file is not None:
        try:
            return k.sasl_password_file.read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise ConfigError(f"kafka.sasl_password_file: cannot read a password from {k.sasl_password_file}") from exc
    password = os.environ.get(k.sasl_password_env)
    if not password:
        raise ConfigError(
            f"kafka.sasl_password_env: set the environment variable {k.sasl_password_env} "
            "(or kafka.sasl_password_file) to the SASL password"
        )
    return password


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
    return _connect(cfg, KafkaProducer, **settings)


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
    return _connect(cfg, KafkaConsumer, *topics, **settings)


def admin(cfg: TbaConfig, **overrides: Any) -> KafkaAdminClient:
    settings = {**_common(cfg), **overrides}
    return _connect(cfg, KafkaAdminClient, **settings)


def _connect(cfg: TbaConfig, client, *args: Any, **settings: Any):
    """A client, or one error line saying what to fix (clients connect, and authenticate, as they start)."""
    k = cfg.kafka
    if not _listening(k):  # the one line saying what kafka-python's retries (debug lines) are about
        log.info("waiting for Kafka at kafka.bootstrap=%s to answer (up to %.0fs)", k.bootstrap, k.client_timeout_s)
    try:
        return client(*args, **settings)
    except (SaslAuthenticationFailedError, KafkaTimeoutError) as exc:  # timeout: no first metadata answer
        if isinstance(exc, KafkaTimeoutError) and not (k.security_protocol.startswith("SASL") and _listening(k)):
            raise BrokerError(
                f"no Kafka broker answered at kafka.bootstrap={k.bootstrap} (security {k.security_protocol}) "
                f"within {k.client_timeout_s:.0f}s: start one (`tba kafka start`) or fix kafka.bootstrap"
            ) from exc
        # kafka-python retries a refused login until its bootstrap timeout: a listening port that never
        # let us in means the credentials
        source = k.sasl_password_file or f"${k.sasl_password_env}"
        raise BrokerError(
            f"Kafka at {k.bootstrap} refused user {k.sasl_username!r} ({k.sasl_mechanism}): "
            f"check kafka.sasl_username and the password in {source}"
        ) from exc


def _listening(k) -> bool:
    """Whether any bootstrap address accepts a TCP connection."""
    for address in k.bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return True
        except (OSError, ValueError):
            continue
    return False
