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
