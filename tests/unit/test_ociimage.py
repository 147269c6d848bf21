"""The synthetic image builder: what it writes is a valid OCI layout whose digests are honest."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from tests.support.ociimage import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    SyntheticImage,
    build_image,
)

SIZES = (1000, 70_000, 3)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> SyntheticImage:
    return build_image(tmp_path_factory.mktemp("image"), layer_sizes=SIZES, seed=7)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_every_blob_is_named_by_the_sha256_of_its_bytes(image: SyntheticImage) -> None:
    files = sorted((image.layout_dir / "blobs" / "sha256").iterdir())
    assert sorted(image.digests) == sorted("sha256:" + path.name for path in files)
    for digest in image.digests:
        assert sha256(image.read_blob(digest)) == digest
        assert image.size(digest) == len(image.read_blob(digest))
    assert set(image.media_types) == set(image.digests)


def test_layers_are_tar_gz_of_one_file_and_diff_ids_hash_the_tar(image: SyntheticImage) -> None:
    config = json.loads(image.read_blob(image.config_digest))
    diff_ids = []
    for digest, size in zip(image.layer_digests, SIZES, strict=True):
        assert image.media_types[digest] == OCI_LAYER_GZIP
        uncompressed = gzip.decompress(image.read_blob(digest))
        diff_ids.append(sha256(uncompressed))
        with tarfile.open(fileobj=io.BytesIO(uncompressed)) as tar:
            [member] = tar.getmembers()
            assert member.isfile()
            assert member.size == size
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
    assert config["os"] == "linux"
    assert config["architecture"] == {"x86_64": "amd64", "aarch64": "arm64"}.get(
        platform.machine(), platform.machine()
    )


def test_index_and_manifest_reference_the_right_digests_and_sizes(image: SyntheticImage) -> None:
    def check(descriptor: dict, digest: str, media_type: str) -> None:
        assert descriptor["digest"] == digest
        assert descriptor["mediaType"] == media_type == image.media_types[digest]
        assert descriptor["size"] == image.size(digest)

    index = json.loads(image.read_blob(image.index_digest))
    assert index["mediaType"] == OCI_INDEX
    [entry] = index["manifests"]
    check(entry, image.manifest_digest, OCI_MANIFEST)
    config = json.loads(image.read_blob(image.config_digest))
    assert entry["platform"] == {"architecture": config["architecture"], "os": "linux"}

    manifest = json.loads(image.read_blob(image.manifest_digest))
    assert manifest["schemaVersion"] == 2
    check(manifest["config"], image.config_digest, OCI_CONFIG)
    assert len(manifest["layers"]) == len(image.layer_digests)
    for descriptor, digest in zip(manifest["layers"], image.layer_digests, strict=True):
        check(descriptor, digest, OCI_LAYER_GZIP)


def test_layout_names_the_image_for_ctr_and_the_tag_for_skopeo(image: SyntheticImage) -> None:
    assert json.loads((image.layout_dir / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    [top] = json.loads((image.layout_dir / "index.json").read_text())["manifests"]
    assert top["digest"] == image.index_digest
    assert top["mediaType"] == OCI_INDEX
    assert top["size"] == image.size(image.index_digest)
    assert top["annotations"] == {
        "io.containerd.image.name": "registry.test/library/demo:v1",
        "org.opencontainers.image.ref.name": "v1",
    }
    assert (image.repository, image.tag) == ("library/demo", "v1")


def test_archive_holds_the_layout(image: SyntheticImage) -> None:
    layout = image.layout_dir
    expected = {str(p.relative_to(layout)) for p in layout.rglob("*") if p.is_file()}
    with tarfile.open(image.archive) as tar:
        assert {m.name for m in tar.getmembers() if m.isfile()} == expected
        index = tar.extractfile("index.json")
        assert index is not None
        assert index.read() == (layout / "index.json").read_bytes()


def test_same_seed_same_digests_other_seed_other_digests(
    image: SyntheticImage, tmp_path: Path
) -> None:
    again = build_image(tmp_path / "again", layer_sizes=SIZES, seed=7)
    other = build_image(tmp_path / "other", layer_sizes=SIZES, seed=8)
    assert again.digests == image.digests
    assert not set(other.layer_digests) & set(image.layer_digests)


def test_layer_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    size = 8 << 20
    tracemalloc.start()
    try:
        image = build_image(tmp_path, layer_sizes=(size,))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.size(image.layer_digests[0]) > size
    assert peak < size // 4, f"peak {peak} bytes while building a {size} byte layer"
