"""Telling manifests and indexes from other content, and what they reference.

containerd records media types only for image targets, so the registry
must recognise a manifest from its bytes, as registries do on push.
"""

from __future__ import annotations

import json
from typing import Any

from spegel_tx.content import Descriptor

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_MEDIA_TYPES = frozenset((OCI_INDEX, DOCKER_MANIFEST_LIST))
MANIFEST_MEDIA_TYPES = frozenset((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
"""The distribution spec's suggested limit; larger content is never a manifest here."""


def _parse(data: bytes) -> dict[str, Any] | None:
    if not data.lstrip().startswith(b"{"):
        return None
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) else None


def detect_media_type(data: bytes) -> str | None:
    """The manifest or index media type of ``data``, or None if it is neither."""
    document = _parse(data)
    if document is None or document.get("schemaVersion") != 2:
        return None
    declared = document.get("mediaType")
    if declared in MANIFEST_MEDIA_TYPES:
        return str(declared)
    if declared is not None:
        return None
    if isinstance(document.get("manifests"), list):
        return OCI_INDEX
    config = document.get("config")
    if isinstance(config, dict) and isinstance(document.get("layers"), list):
        return DOCKER_MANIFEST if config.get("mediaType") == DOCKER_CONFIG else OCI_MANIFEST
    return None


def children(data: bytes) -> list[Descriptor]:
    """The descriptors a manifest (config, layers) or an index (manifests) points at."""
    if detect_media_type(data) is None:
        return []
    document = _parse(data)
    assert document is not None
    entries = list(document.get("manifests") or [])
    if isinstance(document.get("config"), dict):
        entries.append(document["config"])
    entries.extend(document.get("layers") or [])
    found = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
            size = entry.get("size")
            media_type = entry.get("mediaType")
            found.append(
                Descriptor(
                    entry["digest"],
                    media_type if isinstance(media_type, str) else "application/octet-stream",
                    size if isinstance(size, int) else -1,
                )
            )
    return found


def platform_manifest(index: bytes, os: str, architecture: str) -> Descriptor | None:
    """The manifest an index lists for ``os``/``architecture``, else its first one."""
    listed = {descriptor.digest: descriptor for descriptor in children(index)}
    if not listed:
        return None
    document = _parse(index)
    assert document is not None
    for entry in document.get("manifests") or ():
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            continue
        platform = entry.get("platform")
        if (
            isinstance(platform, dict)
            and (platform.get("os"), platform.get("architecture")) == (os, architecture)
            and entry["digest"] in listed
        ):
            return listed[entry["digest"]]
    return next(iter(listed.values()))
