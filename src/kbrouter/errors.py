"""Named exceptions, raised at the point of failure with the offending value in the message."""

from __future__ import annotations


class KBRouterError(Exception):
    """Base class of every kbrouter error."""


class ConfigError(KBRouterError):
    """A configuration file or value is invalid (the message names the field path)."""


class UnknownKBError(KBRouterError, KeyError):
    """A knowledge base name is not in the registry."""

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(f"unknown knowledge base {name!r}; known: {', '.join(known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DataError(KBRouterError):
    """Source data is missing, unreadable, empty or malformed (message names file and line)."""


class IndexError_(KBRouterError):
    """A persisted index is missing, corrupt, or does not match its source/encoder."""


class StaleIndexError(IndexError_):
    """The index was built from other data or with another encoder than configured."""


class ImageError(KBRouterError):
    """An image is missing or cannot be decoded."""


class ModelError(KBRouterError):
    """A model backend failed (server down, timeout, invalid response, missing weights)."""


class ModelUnavailableError(ModelError):
    """The model server cannot be reached (connection failures or timeouts after retries).

    After a few in a row the engine stops the whole run with this error (a circuit breaker)
    instead of failing every remaining question.
    """


class ModelOutputError(KBRouterError):
    """A model's output does not follow the expected format."""


class DatasetError(KBRouterError):
    """A dataset is missing, incomplete or malformed (message says what to download and where)."""


class RouterError(KBRouterError):
    """A learned router cannot be trained, saved or loaded as asked (the message says why)."""
