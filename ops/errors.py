"""One root error for the project; each message names the thing to fix."""


class TbaError(Exception):
    """Root of every error tba-stream raises on purpose."""


class ConfigError(TbaError):
    """A config file or override is invalid; the message names the field."""


class BrokerError(TbaError):
    """The local Kafka broker could not be resolved, started or reached."""


class DecodeError(TbaError):
    """Bytes that are not a readable record; `reason` goes to the dead-letter topic."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DeliveryError(TbaError):
    """Kafka did not acknowledge a record the caller handed to a producer."""
