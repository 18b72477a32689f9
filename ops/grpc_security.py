"""TLS credentials and bearer tokens for the weight-sync service, server and client side.

Secrets never come from config values or command lines: tokens are read from the environment
variables the config names, certificates and keys from files.
"""

from __future__ import annotations

import hmac
import os

import grpc

from ops.config import WeightsConfig
from ops.errors import ConfigError


def _read(path, field: str) -> bytes:
    try:
        return open(path, "rb").read()
    except OSError as exc:
        raise ConfigError(f"weights.{field}: cannot read {path}: {exc.strerror}") from exc


def tokens(cfg: WeightsConfig) -> tuple[str | None, str | None]:
    """(publish token, subscribe token) from the environment; None where unset."""
    return os.environ.get(cfg.publish_token_env) or None, os.environ.get(cfg.subscribe_token_env) or None


def server_credentials(cfg: WeightsConfig) -> grpc.ServerCredentials | None:
    if cfg.tls_cert is None and cfg.tls_key is None:
        return None
    if cfg.tls_cert is None or cfg.tls_key is None:
        raise ConfigError("weights.tls_cert and weights.tls_key: set both, or neither")
    pair = [(_read(cfg.tls_key, "tls_key"), _read(cfg.tls_cert, "tls_cert"))]
    ca = _read(cfg.tls_ca, "tls_ca") if cfg.tls_ca else None
    if cfg.require_client_cert and ca is None:
        raise ConfigError("weights.require_client_cert needs weights.tls_ca (the CA of client certificates)")
    return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=cfg.require_client_cert)


def channel(cfg: WeightsConfig, target: str, interceptors=()) -> grpc.Channel:
    """A client channel to target: TLS when tls_ca is set, sized for 1 MiB chunks, with keepalives, and
    reconnecting within weights.reconnect_max_s once the server is back."""
    options = [
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ("grpc.max_send_message_length", 8 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC's own connection backoff grows to 120 s: after a minute's outage it waited ~40 s more to try again
        ("grpc.initial_reconnect_backoff_ms", int(cfg.reconnect_initial_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(cfg.reconnect_max_s * 1000)),
    ]
    if cfg.tls_ca is not None:
        cert = _read(cfg.client_cert, "client_cert") if cfg.client_cert else None
        key = _read(cfg.client_key, "client_key") if cfg.client_key else None
        creds = grpc.ssl_channel_credentials(_read(cfg.tls_ca, "tls_ca"), private_key=key, certificate_chain=cert)
        ch = grpc.secure_channel(target, creds, options)
    else:
        ch = grpc.insecure_channel(target, options)
    return grpc.intercept_channel(ch, *interceptors) if interceptors else ch


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class TokenAuth(grpc.ServerInterceptor):
    """Checks the bearer token of every call: Publish needs the publish token, Subscribe either token."""

    def __init__(self, publish_token: str | None, subscribe_token: str | None):
        self.publish = publish_token
        self.subscribe = subscribe_token

    def intercept_service(self, continuation, details):
        if self.publish is None and self.subscribe is None:
            return continuation(details)
        given = dict(details.invocation_metadata).get("authorization", "")
        token = given.removeprefix("Bearer ") if given.startswith("Bearer ") else None
        publishing = details.method.endswith("/Publish")
        allowed = [self.publish] if publishing else [self.publish, self.subscribe]
        if token is not None and any(t is not None and hmac.compare_digest(token, t) for t in allowed):
            return continuation(details)
        if token is None:
            code, message = grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (authorization metadata)"
        elif publishing and self.subscribe is not None and hmac.compare_digest(token, self.subscribe):
            code, message = grpc.StatusCode.PERMISSION_DENIED, "this token may subscribe but not publish"
        else:
            code, message = grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token"
        return _refusal(publishing, code, message)


def _refusal(publishing: bool, code: grpc.StatusCode, message: str):
    def abort(_request, context):
        context.abort(code, message)

    if publishing:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_stream_rpc_method_handler(abort)
