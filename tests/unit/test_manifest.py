"""Telling manifests from other content, and listing what they reference."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from spegel_tx.content import Descriptor
from spegel_tx.oci.manifest import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    children,
    detect_media_type,
)

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(char: str) -> str:
    return "sha256:" + char * 64


def entry(media_type: str, char: str, size: int = 10) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest(char), "size": size}


def document(**fields: object) -> bytes:
    return json.dumps({"schemaVersion": 2, **fields}).encode()


def test_declared_media_type_wins():
    for media_type in (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST):
        assert detect_media_type(document(mediaType=media_type)) == media_type


def test_index_without_media_type():
    data = document(manifests=[entry(OCI_MANIFEST, "a")])
    assert detect_media_type(data) == OCI_INDEX


def test_manifest_without_media_type_is_told_by_its_config():
    oci = document(config=entry(OCI_CONFIG, "a"), layers=[entry(OCI_LAYER, "b")])
    docker = document(config=entry(DOCKER_CONFIG, "a"), layers=[])
    assert detect_media_type(oci) == OCI_MANIFEST
    assert detect_media_type(docker) == DOCKER_MANIFEST


def test_not_a_manifest():
    assert detect_media_type(b"") is None
    assert detect_media_type(b"\x1f\x8b\x08\x00 gzip") is None
    assert detect_media_type(b"{not json") is None
    assert detect_media_type(b"[1, 2]") is None
    assert detect_media_type(b'{"architecture": "amd64", "os": "linux"}') is None
    assert detect_media_type(document(mediaType=OCI_CONFIG)) is None
    assert detect_media_type(json.dumps({"manifests": []}).encode()) is None  # no schemaVersion
    assert detect_media_type(b"\xff\xfe{") is None


def test_children_of_a_manifest_are_config_then_layers():
    data = document(
        mediaType=OCI_MANIFEST,
        config=entry(OCI_CONFIG, "a", 3),
        layers=[entry(OCI_LAYER, "b", 4), entry(OCI_LAYER, "c", 5)],
    )
    assert children(data) == [
        Descriptor(digest("a"), OCI_CONFIG, 3),
        Descriptor(digest("b"), OCI_LAYER, 4),
        Descriptor(digest("c"), OCI_LAYER, 5),
    ]


def test_children_of_an_index_are_its_manifests():
    data = document(
        mediaType=OCI_INDEX,
        manifests=[entry(OCI_MANIFEST, "a"), entry(DOCKER_MANIFEST, "b")],
    )
    assert [child.digest for child in children(data)] == [digest("a"), digest("b")]


def test_children_of_anything_else_is_empty():
    assert children(b"\x00\x01") == []
    assert children(b'{"architecture": "amd64"}') == []


def test_children_skip_entries_without_a_digest():
    data = document(mediaType=OCI_INDEX, manifests=[{"size": 3}, "junk", entry(OCI_MANIFEST, "a")])
    assert children(data) == [Descriptor(digest("a"), OCI_MANIFEST, 10)]


descriptors = st.builds(
    Descriptor,
    digest=st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h),
    media_type=st.sampled_from([OCI_MANIFEST, DOCKER_MANIFEST, OCI_CONFIG, OCI_LAYER, "x/y"]),
    size=st.integers(min_value=0, max_value=2**53),
)


def as_entry(descriptor: Descriptor) -> dict[str, object]:
    return {
        "mediaType": descriptor.media_type,
        "digest": descriptor.digest,
        "size": descriptor.size,
    }


@given(st.lists(descriptors, max_size=8), st.booleans())
def test_index_round_trip(manifests: list[Descriptor], declared: bool) -> None:
    fields: dict[str, object] = {"manifests": [as_entry(d) for d in manifests]}
    if declared:
        fields["mediaType"] = OCI_INDEX
    data = document(**fields)
    assert detect_media_type(data) == OCI_INDEX
    assert children(data) == manifests


@given(descriptors, st.lists(descriptors, max_size=8), st.sampled_from([None, OCI_MANIFEST]))
def test_manifest_round_trip(
    config: Descriptor, layers: list[Descriptor], declared: str | None
) -> None:
    fields: dict[str, object] = {
        "config": as_entry(config),
        "layers": [as_entry(d) for d in layers],
    }
    if declared:
        fields["mediaType"] = declared
    data = document(**fields)
    assert detect_media_type(data) in (OCI_MANIFEST, DOCKER_MANIFEST)
    assert children(data) == [config, *layers]


@given(st.binary())
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    if detect_media_type(data) is None:
        assert children(data) == []
