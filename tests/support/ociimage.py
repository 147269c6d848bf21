"""Synthetic multi-layer OCI images, built without docker and streamed to disk.

Each layer is a valid tar.gz of one file of seeded random (incompressible)
bytes, so containerd can unpack it and a 1 GiB layer never sits in memory.
The result is an OCI image layout directory (for ``skopeo copy oci:DIR:TAG``)
and an OCI archive (for ``ctr images import``) naming the image.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class SyntheticImage:
    name: str
    layout_dir: Path
    archive: Path
    index_digest: str
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]
    media_types: dict[str, str]

    @property
    def tag(self) -> str:
        return self.name.rsplit(":", 1)[1]

    @property
    def repository(self) -> str:
        """The repository path without the registry: ``library/demo``."""
        return self.name.split("/", 1)[1].rsplit(":", 1)[0]

    @property
    def digests(self) -> list[str]:
        return [self.index_digest, self.manifest_digest, self.config_digest, *self.layer_digests]

    def blob_path(self, digest: str) -> Path:
        return self.layout_dir / "blobs" / "sha256" / digest.split(":", 1)[1]

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def size(self, digest: str) -> int:
        return self.blob_path(digest).stat().st_size


class _HashingWriter:
    """Passes writes through to ``target`` while hashing them."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self._target.write(data)
        return len(data)

    def flush(self) -> None:
        self._target.flush()


class _RandomReader:
    """``size`` seeded random bytes, read in whatever chunks the caller asks."""

    def __init__(self, rng: random.Random, size: int) -> None:
        self._rng = rng
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return self._rng.randbytes(n)


def _write_blob(blobs: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return digest


def _write_layer(blobs: Path, rng: random.Random, index: int, size: int) -> tuple[str, str]:
    """Stream one tar.gz layer to disk; returns (digest, diff_id)."""
    partial = blobs / f"layer-{index}.partial"
    with partial.open("wb") as out:
        compressed = _HashingWriter(out)
        # Level 0 (stored blocks) is still valid gzip; random bytes don't shrink anyway,
        # and deflating them held a 1 GiB layer to about 30 MiB/s.
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=0, mtime=0) as gz:  # type: ignore[arg-type]
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|") as tar:  # type: ignore[call-overload]
                info = tarfile.TarInfo(f"layer-{index}.bin")
                info.size = size
                tar.addfile(info, _RandomReader(rng, size))
    digest = "sha256:" + compressed.sha256.hexdigest()
    partial.rename(blobs / digest.split(":", 1)[1])
    return digest, "sha256:" + uncompressed.sha256.hexdigest()


def build_image(
    directory: Path,
    name: str = "registry.test/library/demo:v1",
    layer_sizes: tuple[int, ...] = (1 << 20, 2 << 20, 3 << 20),
    seed: int = 0,
) -> SyntheticImage:
    """Build the image under ``directory`` (layout/ and image.tar); same seed, same digests."""
    rng = random.Random(seed)
    layout = directory / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    media_types: dict[str, str] = {}
    layers = []
    for index, size in enumerate(layer_sizes):
        digest, diff_id = _write_layer(blobs, rng, index, size)
        media_types[digest] = OCI_LAYER_GZIP
        layers.append((digest, diff_id))

    def descriptor(media_type: str, digest: str) -> dict[str, Any]:
        return {
            "mediaType": media_type,
            "digest": digest,
            "size": (blobs / digest.split(":", 1)[1]).stat().st_size,
        }

    architecture = _ARCHITECTURES.get(platform.machine(), platform.machine())
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
    }
    config_digest = _write_blob(blobs, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config_digest),
        "layers": [descriptor(OCI_LAYER_GZIP, digest) for digest, _ in layers],
    }
    manifest_digest = _write_blob(blobs, json.dumps(manifest).encode())
    entry = descriptor(OCI_MANIFEST, manifest_digest)
    entry["platform"] = {"architecture": architecture, "os": "linux"}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    index_digest = _write_blob(blobs, json.dumps(index).encode())
    media_types |= {
        config_digest: OCI_CONFIG,
        manifest_digest: OCI_MANIFEST,
        index_digest: OCI_INDEX,
    }

    top = descriptor(OCI_INDEX, index_digest)
    top["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    archive = directory / "image.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(layout.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(layout)))
    return SyntheticImage(
        name=name,
        layout_dir=layout,
        archive=archive,
        index_digest=index_digest,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=tuple(digest for digest, _ in layers),
        media_types=media_types,
    )
