"""Exceptions raised below the HTTP layer; registry/app.py maps them to OCI errors."""


class SpegelError(Exception):
    """Base of every error spegel-tx raises on purpose."""


class NotFound(SpegelError):
    """The content or name is not held here."""


class Filtered(SpegelError):
    """The name is excluded by ``registry-filters`` or ``mirrored-registries``."""


class Unauthorized(SpegelError):
    """A request without the registry's Basic authentication credentials."""


class InvalidReference(SpegelError):
    """A repository name, tag or digest that the distribution spec does not allow."""


class InvalidDigest(SpegelError):
    """A digest that is malformed or uses an algorithm we cannot verify."""


class Unavailable(SpegelError):
    """A backend (containerd) cannot be reached right now."""


class ConfigError(SpegelError):
    """A configuration value is wrong; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem
