"""ContainerdClient and ContainerdStore against a real containerd of their own.

Each containerd here has its own root, state, sockets and opt directory
under a temporary directory, so nothing of the machine's is touched. The
restart test kills and restarts its containerd, so it gets one to itself.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from spegel_tx.containerd.client import ContainerdClient
from spegel_tx.containerd.store import ContainerdStore, FileBlob, StreamBlob
from spegel_tx.content import ImageEvent, ImageEventKind
from spegel_tx.errors import NotFound, Unavailable
from spegel_tx.oci.manifest import OCI_INDEX, OCI_MANIFEST

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("containerd") is None or shutil.which("ctr") is None or os.geteuid() != 0,
        reason="needs containerd, ctr and root",
    ),
]

NAMESPACE = "k8s.io"
IMAGE_NAME = "docker.io/library/demo:v1"

CONFIG = """\
version = 2
root = "{base}/root"
state = "{base}/state"
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd-ttrpc.sock"
[debug]
  address = "{base}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{base}/certs.d"
"""


class Containerd:
    """One containerd process on its own directories; ``start`` again after ``kill``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.address = str(base / "containerd.sock")
        self.content_root = str(base / "root" / "io.containerd.content.v1.content")
        self.config = base / "config.toml"
        self.config.write_text(CONFIG.format(base=base))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.base / "containerd.log", "ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited; see {self.base / 'containerd.log'}")
            answer = subprocess.run(
                ["ctr", "--address", self.address, "version"], capture_output=True, timeout=10
            )
            if answer.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("containerd did not answer in time")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def ctr(self, *args: str) -> str:
        answer = subprocess.run(
            ["ctr", "--address", self.address, "-n", NAMESPACE, *args],
            capture_output=True,
            timeout=60,
            check=True,
        )
        return answer.stdout.decode()


@dataclass
class DemoImage:
    """An OCI archive: index -> manifest -> config + one layer bigger than a gRPC chunk."""

    name: str
    blobs: dict[str, bytes] = field(default_factory=dict)
    index_digest: str = ""
    manifest_digest: str = ""
    config_digest: str = ""
    layer_digest: str = ""

    def add(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def write_archive(self, path: Path) -> None:
        with tarfile.open(path, "w") as archive:
            top = {
                "mediaType": OCI_INDEX,
                "digest": self.index_digest,
                "size": len(self.blobs[self.index_digest]),
                "annotations": {"io.containerd.image.name": self.name},
            }
            files = {
                "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
                "index.json": json.dumps({"schemaVersion": 2, "manifests": [top]}).encode(),
            }
            for digest, data in self.blobs.items():
                files["blobs/sha256/" + digest.split(":")[1]] = data
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def build_demo_image(name: str) -> DemoImage:
    image = DemoImage(name)
    payload = os.urandom(3 * 1024 * 1024 + 123)  # incompressible: several Read chunks
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as layer:
        info = tarfile.TarInfo("payload.bin")
        info.size = len(payload)
        layer.addfile(info, io.BytesIO(payload))
    diff_id = "sha256:" + hashlib.sha256(layer_tar.getvalue()).hexdigest()
    image.layer_digest = image.add(gzip.compress(layer_tar.getvalue(), compresslevel=1))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": {},
    }
    image.config_digest = image.add(json.dumps(config).encode())

    def descriptor(media_type: str, digest: str) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": digest, "size": len(image.blobs[digest])}

    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", image.config_digest),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", image.layer_digest)],
    }
    image.manifest_digest = image.add(json.dumps(manifest).encode())
    entry = descriptor(OCI_MANIFEST, image.manifest_digest)
    entry["platform"] = {"architecture": "amd64", "os": "linux"}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    image.index_digest = image.add(json.dumps(index).encode())
    return image


def run_containerd(base: Path) -> Iterator[Containerd]:
    containerd = Containerd(base)
    try:
        containerd.start()
        yield containerd
    finally:
        containerd.stop()


@pytest.fixture(scope="module")
def demo_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoImage, Path]:
    image = build_demo_image(IMAGE_NAME)
    path = tmp_path_factory.mktemp("image") / "demo.tar"
    image.write_archive(path)
    return image, path


@pytest.fixture(scope="module")
def own_containerd(
    tmp_path_factory: pytest.TempPathFactory, demo_archive: tuple[DemoImage, Path]
) -> Iterator[Containerd]:
    for containerd in run_containerd(tmp_path_factory.mktemp("containerd")):
        containerd.ctr("images", "import", str(demo_archive[1]))
        yield containerd


@pytest.fixture
def demo(demo_archive: tuple[DemoImage, Path]) -> DemoImage:
    return demo_archive[0]


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.05)


async def started_store(address: str, content_path: str = "") -> ContainerdStore:
    store = ContainerdStore(reactor, address, NAMESPACE, content_path)
    store.startService()
    await wait_until(store.ready)
    return store


def test_client_reads_the_api(own_containerd: Containerd, demo: DemoImage) -> None:
    client = ContainerdClient(own_containerd.address, NAMESPACE)
    try:
        assert client.version().version.startswith(("1.", "2."))
        [content] = client.plugins(["type==io.containerd.content.v1,id==content"])
        assert content.exports["root"] == own_containerd.content_root
        image = client.get_image(IMAGE_NAME)
        assert (image.target.digest, image.target.media_type) == (demo.index_digest, OCI_INDEX)
        assert IMAGE_NAME in [i.name for i in client.list_images()]
        layer = demo.blobs[demo.layer_digest]
        assert client.content_info(demo.layer_digest).size == len(layer)
        present = {info.digest for info in client.list_content()}
        assert set(demo.blobs) <= present
        chunks = list(client.read_content(demo.layer_digest))
        assert len(chunks) > 1
        assert b"".join(chunks) == layer
        assert b"".join(client.read_content(demo.layer_digest, 100, 50)) == layer[100:150]
        with pytest.raises(NotFound):
            client.get_image("docker.io/library/absent:v1")
        with pytest.raises(NotFound):
            client.content_info("sha256:" + "0" * 64)
        with pytest.raises(NotFound):
            list(client.read_content("sha256:" + "0" * 64))
    finally:
        client.close()
    nobody = ContainerdClient(str(own_containerd.base / "absent.sock"), NAMESPACE)
    try:
        with pytest.raises(Unavailable):
            nobody.version()
    finally:
        nobody.close()


@pytest_twisted.ensureDeferred
async def test_store_reads_images_from_disk(own_containerd: Containerd, demo: DemoImage) -> None:
    store = await started_store(own_containerd.address)
    try:
        assert store.content_path == own_containerd.content_root
        assert await store.resolve(IMAGE_NAME) == demo.index_digest
        with pytest.raises(NotFound):
            await store.resolve("docker.io/library/absent:v1")
        [image] = [i for i in await store.images() if i.name == IMAGE_NAME]
        assert (image.digest, image.media_type) == (demo.index_digest, OCI_INDEX)
        assert sorted(await store.digests(image)) == sorted(demo.blobs)
        for digest, media_type in [
            (demo.index_digest, OCI_INDEX),
            (demo.manifest_digest, OCI_MANIFEST),
            (demo.config_digest, "application/octet-stream"),
            (demo.layer_digest, "application/octet-stream"),
        ]:
            descriptor = await store.descriptor(digest)
            assert (descriptor.media_type, descriptor.size) == (media_type, len(demo.blobs[digest]))
        layer = demo.blobs[demo.layer_digest]
        blob = await store.open(demo.layer_digest)
        try:
            assert isinstance(blob, FileBlob)
            fd = blob.fileno()
            assert fd is not None
            assert os.fstat(fd).st_size == len(layer)
            assert await read_all(blob) == layer
        finally:
            blob.close()
        with pytest.raises(NotFound):
            await store.open("sha256:" + "0" * 64)
    finally:
        store.stopService()


async def read_all(blob: Any, length: int = 256 * 1024) -> bytes:
    parts: list[bytes] = []
    position = 0
    while True:
        data = await blob.read(position, length)
        if not data:
            return b"".join(parts)
        parts.append(data)
        position += len(data)


@pytest_twisted.ensureDeferred
async def test_store_falls_back_to_grpc(
    own_containerd: Containerd, demo: DemoImage, tmp_path: Path
) -> None:
    store = await started_store(own_containerd.address, str(tmp_path / "wrong"))
    try:
        descriptor = await store.descriptor(demo.manifest_digest)
        assert descriptor.media_type == OCI_MANIFEST
        [image] = [i for i in await store.images() if i.name == IMAGE_NAME]
        assert sorted(await store.digests(image)) == sorted(demo.blobs)
        layer = demo.blobs[demo.layer_digest]
        blob = await store.open(demo.layer_digest)
        try:
            assert isinstance(blob, StreamBlob)
            assert blob.fileno() is None
            assert blob.size == len(layer)
            assert await read_all(blob) == layer
            assert await blob.read(len(layer) - 10, 100) == layer[-10:]
            assert await blob.read(12345, 100) == layer[12345:12445]
        finally:
            blob.close()
    finally:
        store.stopService()


class Events:
    """Collects image events and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[ImageEvent] = []

    def __call__(self, event: ImageEvent) -> None:
        self.seen.append(event)

    async def wait_for(self, kind: ImageEventKind, name: str, timeout: float = 20.0) -> None:
        await wait_until(lambda: ImageEvent(kind, name) in self.seen, timeout)


@pytest_twisted.ensureDeferred
async def test_subscribe_sees_tags_come_and_go(own_containerd: Containerd) -> None:
    store = await started_store(own_containerd.address)
    events = Events()
    unsubscribe = store.subscribe(events)
    name = "docker.io/library/demo:events"
    try:
        await deferLater(reactor, 0.2)  # let the Subscribe call reach containerd
        own_containerd.ctr("images", "tag", IMAGE_NAME, name)
        await events.wait_for(ImageEventKind.CREATE, name)
        own_containerd.ctr("images", "rm", name)
        await events.wait_for(ImageEventKind.DELETE, name)
        assert all(e.name != IMAGE_NAME for e in events.seen), "only changes are sent"
    finally:
        unsubscribe()
        store.stopService()


@pytest.fixture
def restartable_containerd(
    tmp_path_factory: pytest.TempPathFactory, demo_archive: tuple[DemoImage, Path]
) -> Iterator[Containerd]:
    for containerd in run_containerd(tmp_path_factory.mktemp("restart")):
        containerd.ctr("images", "import", str(demo_archive[1]))
        yield containerd


@pytest_twisted.ensureDeferred
async def test_store_follows_a_containerd_restart(restartable_containerd: Containerd) -> None:
    containerd = restartable_containerd
    store = ContainerdStore(reactor, containerd.address, NAMESPACE, max_retry_delay=2.0)
    events = Events()
    store.subscribe(events)
    store.startService()
    try:
        await wait_until(store.ready)
        subscriptions = store.subscriptions
        containerd.kill()
        await wait_until(lambda: not store.ready())
        with pytest.raises(Unavailable):
            await store.resolve(IMAGE_NAME)
        await deferLater(reactor, 1.0)
        containerd.start()
        await wait_until(store.ready)
        assert await store.resolve(IMAGE_NAME)
        await wait_until(lambda: store.subscriptions > subscriptions)
        # A new stream only proves itself with an event: tag until one arrives.
        for attempt in range(40):
            name = f"docker.io/library/demo:after-restart-{attempt}"
            containerd.ctr("images", "tag", IMAGE_NAME, name)
            try:
                await events.wait_for(ImageEventKind.CREATE, name, timeout=0.5)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError("no event after containerd restarted")
    finally:
        store.stopService()
