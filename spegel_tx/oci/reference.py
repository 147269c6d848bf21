"""Repository names, tags and image names, per the OCI distribution spec."""

from __future__ import annotations

import re
from dataclasses import dataclass

from spegel_tx.errors import InvalidReference
from spegel_tx.oci.digest import is_digest, parse_digest

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class Reference:
    """What a ``/v2/<repository>/manifests/<tag or digest>`` path asks for.

    ``registry`` comes from containerd's ``ns`` query parameter and is None
    when a client talks to us directly.
    """

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The image name containerd would store this tag under."""
        return f"{self.registry}/{self.repository}:{self.tag}"


def parse_repository(repository: str) -> str:
    if len(repository) > _MAX_NAME_LENGTH or not _REPOSITORY.fullmatch(repository):
        raise InvalidReference(f"invalid repository name {repository!r}")
    return repository


def parse_registry(registry: str) -> str:
    """Accept ``host``, ``host:port`` and ``[v6]:port``; reject anything with a path."""
    if not registry or any(c in registry for c in "/?#@ ") or len(registry) > _MAX_NAME_LENGTH:
        raise InvalidReference(f"invalid registry {registry!r} in ns")
    return registry


def parse_reference(registry: str | None, repository: str, reference: str) -> Reference:
    """Parse the repository and the tag-or-digest part of a manifest path."""
    repository = parse_repository(repository)
    if registry is not None:
        registry = parse_registry(registry)
    if ":" in reference:
        return Reference(registry, repository, digest=parse_digest(reference))
    if not _TAG.fullmatch(reference):
        raise InvalidReference(f"invalid tag {reference!r}")
    return Reference(registry, repository, tag=reference)


@dataclass(frozen=True)
class ImageName:
    """A containerd image name split into its parts."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None


def split_image_name(name: str) -> ImageName | None:
    """Split a fully qualified containerd image name, or None if it is not one.

    containerd stores names such as ``docker.io/library/nginx:1.27``,
    ``ghcr.io/org/app@sha256:...`` and CRI's bare ``sha256:<config>`` ids;
    the last are not image references and give None.
    """
    rest, _, digest = name.partition("@")
    if digest and not is_digest(digest):
        return None
    registry, slash, path = rest.partition("/")
    if not slash:
        return None
    repository, tag = path, None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        repository, tag = path[:colon], path[colon + 1 :]
        if not _TAG.fullmatch(tag):
            return None
    if not _REPOSITORY.fullmatch(repository):
        return None
    return ImageName(registry, repository, tag, digest or None)
