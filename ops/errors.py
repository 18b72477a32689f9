"""The errors of the platform and above; each message names the thing to fix. The root (TbaError) and
DecodeError belong to the contract (schemas/errors.py), re-exported here."""

from schemas.errors import DecodeError, TbaError

__all__ = ["AccessDenied", "BrokerError", "ConfigError", "DecodeError", "DeliveryError", "RegistryError", "TbaError"]


class ConfigError(TbaError):
    """A config file or override is invalid; the message names the field."""


class BrokerError(TbaError):
    """The local Kafka broker could not be resolved, started or reached."""


class DeliveryError(TbaError):
    """Kafka did not acknowledge a record the caller handed to a producer."""


class AccessDenied(TbaError):
    """The broker's authorizer refused this principal an operation (ops/acls.py says who may)."""


class RegistryError(TbaError):
    """The schema registry could not be resolved, started or reached, or refused a writer's schema."""
