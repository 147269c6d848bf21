"""Value types the content store hands out; immutable so they can cross threads."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Descriptor:
    """What a registry must know to answer for one piece of content."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Image:
    """A name containerd holds (``registry/repo:tag``) and the digest it points at."""

    name: str
    digest: str
    media_type: str


class ImageEventKind(enum.Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    RESYNC = "resync"
    """Events may have been missed (a new stream after a broken one): list everything again."""


@dataclass(frozen=True)
class ImageEvent:
    """An image name appearing, moving or disappearing in containerd."""

    kind: ImageEventKind
    name: str


class FirstWave(enum.Enum):
    """What a node shares of an image it is still pulling (``first-wave-sharing``)."""

    IN_FLIGHT = "in-flight"
    """Each blob from the moment its download starts, and again once committed."""
    COMMITTED = "committed"
    """Each blob once containerd has committed it."""
    OFF = "off"
    """Nothing until the image is complete, as Spegel does."""


IN_FLIGHT_PREFIX = "in-flight:"


def in_flight_key(digest: str) -> str:
    """The DHT key of a blob still being downloaded: apart from the digest's own key,
    so that a complete copy is found, and preferred, on its own."""
    return IN_FLIGHT_PREFIX + digest
