"""The registry API against the in-memory store, through treq's StubTreq (no sockets)."""

import base64
import hashlib
import json
import os
import re

import pytest
import twisted.web.http
from treq.testing import StubTreq
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure

from spegel_tx.basicauth import BasicAuth
from spegel_tx.errors import Unavailable
from spegel_tx.registry.access import RegistrySite
from spegel_tx.registry.app import Registry
from spegel_tx.testing import ControlledBlob, MemoryStore

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
NAME = "registry.test/library/demo:v1"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


class Image:
    """A small OCI image: index → manifest → config + two layers."""

    def __init__(self, seed: int = 0) -> None:
        self.layers = [bytes([seed]) * 1000 + os.urandom(300_000), os.urandom(70_001)]
        self.config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor("application/vnd.oci.image.config.v1+json", self.config),
                "layers": [
                    descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)
                    for layer in self.layers
                ],
            }
        ).encode()
        self.index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [descriptor(OCI_MANIFEST, self.manifest)],
            }
        ).encode()

    def blobs(self) -> list[bytes]:
        return [self.index, self.manifest, self.config, *self.layers]


@pytest.fixture
def image():
    return Image()


@pytest.fixture
def store(image):
    return MemoryStore(image.blobs(), {NAME: digest_of(image.index)})


def client(store, **options):
    return StubTreq(Registry(MemoryReactor(), store, **options).resource())


def errors(body: bytes) -> list[str]:
    return [e["code"] for e in json.loads(body)["errors"]]


@pytest.mark.parametrize("path", ["/v2/", "/livez", "/readyz"])
def test_ping_and_health(store, path):
    response = client(store).get("http://node" + path).result
    assert response.code == 200


def test_readyz_fails_while_the_store_is_down(store):
    store.is_ready = False
    response = client(store).get("http://node/readyz").result
    assert response.code == 503


def raw_exchange(store, request: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers and body bytes exactly as they would go on the wire."""
    channel = RegistrySite(Registry(MemoryReactor(), store).resource()).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in lines)}
    return status, headers, body


def test_head_manifest_by_tag_with_ns_gives_what_containerd_needs(store, image):
    status, headers, body = raw_exchange(
        store, b"HEAD /v2/library/demo/manifests/v1?ns=registry.test HTTP/1.1\r\nHost: n\r\n\r\n"
    )
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"docker-content-digest"] == digest_of(image.index).encode()
    assert headers[b"content-type"] == OCI_INDEX.encode()
    assert headers[b"content-length"] == b"%d" % len(image.index)
    assert body == b""


def test_get_manifest_by_digest(store, image):
    http = client(store)
    digest = digest_of(image.manifest)
    response = http.get(f"http://node/v2/library/demo/manifests/{digest}?ns=registry.test").result
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == [OCI_MANIFEST]
    assert http.content(response).result == image.manifest


def test_a_tag_without_ns_is_not_resolved_even_when_held_here(store, image):
    """As in Spegel: which image a bare tag names would depend on the node asked."""
    http = client(store)
    response = http.get("http://node/v2/library/demo/manifests/v1").result
    assert response.code == 404
    [error] = json.loads(http.content(response).result)["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "ns" in error["message"]
    by_digest = http.get(f"http://node/v2/library/demo/manifests/{digest_of(image.index)}")
    assert http.content(by_digest.result).result == image.index


def test_unknown_tag_and_non_manifest_digest_are_manifest_unknown(store, image):
    http = client(store)
    for path in [
        "/v2/library/demo/manifests/v2?ns=registry.test",
        f"/v2/library/demo/manifests/{digest_of(image.layers[0])}",
        f"/v2/library/demo/manifests/{digest_of(b'absent')}",
    ]:
        response = http.get("http://node" + path).result
        assert response.code == 404, path
        assert errors(http.content(response).result) == ["MANIFEST_UNKNOWN"]


def test_get_blob_streams_every_byte_and_releases_it(store, image):
    http = client(store)
    layer = image.layers[0]
    response = http.get(f"http://node/v2/library/demo/blobs/{digest_of(layer)}").result
    assert response.code == 200
    assert response.headers.getRawHeaders("accept-ranges") == ["bytes"]
    assert response.length == len(layer)
    assert response.headers.getRawHeaders("docker-content-digest") == [digest_of(layer)]
    assert http.content(response).result == layer
    assert [blob.closed for blob in store.opened] == [True]


def test_head_blob_sends_headers_only(store, image):
    layer = image.layers[1]
    request = (
        b"HEAD /v2/library/demo/blobs/%s HTTP/1.1\r\nHost: n\r\n\r\n" % digest_of(layer).encode()
    )
    status, headers, body = raw_exchange(store, request)
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-length"] == b"%d" % len(layer)
    assert b"transfer-encoding" not in headers
    assert body == b""
    assert store.opened == []


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [("bytes=10-19", 10, 19), ("bytes=-5", 69_996, 70_000), ("bytes=69990-", 69_990, 70_000)],
)
def test_ranges_give_206(store, image, header, first, last):
    http = client(store)
    layer = image.layers[1]
    url = f"http://node/v2/library/demo/blobs/{digest_of(layer)}"
    response = http.get(url, headers={"Range": header}).result
    assert response.code == 206
    assert response.headers.getRawHeaders("content-range") == [f"bytes {first}-{last}/{len(layer)}"]
    assert http.content(response).result == layer[first : last + 1]


def test_unsatisfiable_range_gives_416(store, image):
    http = client(store)
    layer = image.layers[1]
    url = f"http://node/v2/library/demo/blobs/{digest_of(layer)}"
    response = http.get(url, headers={"Range": f"bytes={len(layer)}-"}).result
    assert response.code == 416
    assert response.headers.getRawHeaders("content-range") == [f"bytes */{len(layer)}"]
    assert errors(http.content(response).result) == ["SIZE_INVALID"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/library/demo/blobs/sha256:nothex", 400, "DIGEST_INVALID"),
        ("GET", "/v2/library/demo/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/Library/Demo/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/library/demo/manifests/.bad", 400, "NAME_INVALID"),
        ("GET", "/v2/library/demo/manifests/v1?ns=a/b", 400, "NAME_INVALID"),
        ("GET", "/v2/library/demo/blobs/" + digest_of(b"x"), 404, "BLOB_UNKNOWN"),
        ("PUT", "/v2/library/demo/manifests/v1", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/library/demo/blobs/" + digest_of(b"x"), 405, "UNSUPPORTED"),
        ("POST", "/v2/library/demo/blobs/uploads/", 405, "UNSUPPORTED"),
        ("GET", "/v2/library/demo/tags/list", 404, "NAME_UNKNOWN"),
        ("GET", "/nowhere", 404, "NAME_UNKNOWN"),
    ],
)
def test_bad_requests_get_oci_errors(store, method, path, status, code):
    http = client(store)
    response = http.request(method, "http://node" + path).result
    assert response.code == status
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    body = http.content(response).result
    assert errors(body) == [code]
    assert b"Traceback" not in body


def test_mirrored_registries_and_filters_hide_names(store, image):
    url = "http://node/v2/library/demo/manifests/v1?ns=registry.test"
    assert client(store, mirrored_registries=["docker.io"]).get(url).result.code == 404
    assert client(store, mirrored_registries=["registry.test"]).get(url).result.code == 200
    filtered = client(store, registry_filters=[re.compile(":v1$")])
    assert filtered.get(url).result.code == 404
    blob_url = f"http://node/v2/library/demo/blobs/{digest_of(image.config)}?ns=docker.io"
    assert client(store, mirrored_registries=["registry.test"]).get(blob_url).result.code == 404


def paths(image, ns: str | None = "registry.test") -> list[str]:
    """A manifest by digest and a blob, as containerd asks for them after a tag."""
    query = f"?ns={ns}" if ns else ""
    return [
        f"/v2/library/demo/manifests/{digest_of(image.manifest)}{query}",
        f"/v2/library/demo/blobs/{digest_of(image.layers[0])}{query}",
    ]


@pytest.mark.parametrize(
    ("pattern", "served"),
    [
        (r"^registry\.test/", False),
        (r"^registry\.test/library/demo$", False),
        (r"^other\.test/", True),
        # A digest request has no tag: a tag filter leaves its content alone, as in Spegel.
        (r":v1$", True),
    ],
)
def test_filters_apply_to_content_asked_for_by_digest(store, image, pattern, served):
    http = client(store, registry_filters=[re.compile(pattern)])
    for path in paths(image):
        response = http.get("http://node" + path).result
        assert response.code == (200 if served else 404), path
        if not served:
            assert errors(http.content(response).result)[0].endswith("_UNKNOWN")
    if served:
        assert [blob.closed for blob in store.opened] == [True, True]
    else:
        assert store.opened == [], "filtered content must not even be opened"


def test_with_filters_a_request_without_ns_cannot_be_checked_so_is_not_served(store, image):
    assert all(client(store).get("http://node" + p).result.code == 200 for p in paths(image, None))
    for options in (
        {"registry_filters": [re.compile("^nothing/")]},
        {"mirrored_registries": ["registry.test"]},
    ):
        http = client(store, **options)
        for path in paths(image, None):
            response = http.get("http://node" + path).result
            assert response.code == 404, (options, path)
            assert "ns" in json.loads(http.content(response).result)["errors"][0]["message"]


def test_content_answers_name_the_registry_in_oci_namespace(store, image):
    http = client(store)
    tag = "http://node/v2/library/demo/manifests/v1?ns=registry.test"
    for method, url in [("HEAD", tag), ("GET", tag)] + [
        ("GET", "http://node" + path) for path in paths(image)
    ]:
        response = http.request(method, url).result
        assert response.code == 200
        assert response.headers.getRawHeaders("oci-namespace") == ["registry.test"], url
    ranged = http.get("http://node" + paths(image)[1], headers={"Range": "bytes=0-9"}).result
    assert ranged.headers.getRawHeaders("oci-namespace") == ["registry.test"]
    bare = http.get("http://node" + paths(image, None)[1]).result
    assert bare.code == 200
    assert not bare.headers.hasHeader("oci-namespace")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v2/library/demo/manifests/v1"),
        ("DELETE", "/v2/library/demo/blobs/" + digest_of(b"x")),
        ("POST", "/v2/library/demo/blobs/uploads/"),
        ("PATCH", "/v2/library/demo/blobs/uploads/1"),
        ("POST", "/v2/"),
        ("OPTIONS", "/v2/library/demo/manifests/v1"),
        ("POST", "/readyz"),
    ],
)
def test_a_405_says_which_methods_are_allowed(store, method, path):
    http = client(store)
    response = http.request(method, "http://node" + path).result
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET, HEAD"]
    assert errors(http.content(response).result) == ["UNSUPPORTED"]


SPEC_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
}  # fmt: skip


def test_every_error_code_is_one_the_distribution_spec_allows():
    from spegel_tx.oci.errors import ErrorCode

    assert {code.value[0] for code in ErrorCode} <= SPEC_CODES


def test_an_error_of_ours_is_a_plain_500_not_a_made_up_code(store):
    store.descriptor = lambda digest: fail(RuntimeError("bug"))
    http = client(store)
    response = http.get("http://node" + "/v2/library/demo/blobs/" + digest_of(b"x")).result
    assert response.code == 500
    assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    assert http.content(response).result == b"internal error\n"


def test_unavailable_store_is_a_fast_404(store):
    store.resolve = lambda name: fail(Unavailable("socket refused"))
    http = client(store)
    response = http.get("http://node/v2/library/demo/manifests/v1?ns=registry.test").result
    assert response.code == 404
    assert (
        "containerd is unavailable"
        in json.loads(http.content(response).result)["errors"][0]["message"]
    )


def serve_over_string_transport(store, blob):
    store.open = lambda digest: succeed(blob)
    site = RegistrySite(Registry(MemoryReactor(), store).resource())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    digest = next(d for d, data in store.blobs.items() if len(data) == 70_001)
    store.blobs[digest] = b"\0" * blob.size
    channel.dataReceived(b"GET /v2/a/blobs/%s HTTP/1.1\r\nHost: node\r\n\r\n" % digest.encode())
    return channel, transport


def test_reads_stop_while_the_transport_is_paused(store):
    blob = ControlledBlob()
    _, transport = serve_over_string_transport(store, blob)
    assert len(blob.reads) == 1
    blob.reads[0][1].callback(b"a" * 65536)
    assert len(blob.reads) == 2
    transport.producer.pauseProducing()
    blob.reads[1][1].callback(b"b" * 65536)
    assert len(blob.reads) == 2, "a paused transport must not cause more reads"
    transport.producer.resumeProducing()
    assert [offset for offset, _ in blob.reads] == [0, 65536, 131072]
    blob.reads[2][1].callback(b"c" * 65536)
    assert transport.value().endswith(b"a" * 65536 + b"b" * 65536 + b"c" * 65536)
    assert blob.closed


def test_client_disconnect_mid_blob_releases_it(store):
    blob = ControlledBlob()
    channel, _ = serve_over_string_transport(store, blob)
    blob.reads[0][1].callback(b"a" * 65536)
    channel.connectionLost(Failure(ConnectionLost()))
    assert blob.closed
    assert len(blob.reads) == 2
    blob.reads[1][1].callback(b"b" * 65536)
    assert len(blob.reads) == 2


def test_every_request_logs_one_event_even_when_cut_off(store, image):
    from twisted.logger import globalLogPublisher

    events: list[dict] = []

    def observe(event):
        if event.get("log_namespace") == "spegel_tx.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        site = RegistrySite(Registry(MemoryReactor(), store).resource())
        channel = site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        layer = digest_of(image.layers[0])
        channel.dataReceived(b"GET /v2/a/blobs/%s HTTP/1.1\r\nHost: n\r\n\r\n" % layer.encode())
        channel.dataReceived(b"GET /v2/a/blobs/sha256:zz HTTP/1.1\r\nHost: n\r\n\r\n")
        blob = ControlledBlob()
        channel, _ = serve_over_string_transport(store, blob)
        blob.reads[0][1].callback(b"a" * 100)
        channel.connectionLost(Failure(ConnectionLost()))
    finally:
        globalLogPublisher.removeObserver(observe)
    summary = [(e["status"], e["handler"], e["bytes"], e["completed"]) for e in events]
    _, _, invalid = raw_exchange(store, b"GET /v2/a/blobs/sha256:zz HTTP/1.1\r\nHost: n\r\n\r\n")
    assert errors(invalid) == ["DIGEST_INVALID"]
    assert summary == [
        (200, "local", len(image.layers[0]), True),
        (400, "-", len(invalid), True),
        (200, "local", 100, False),
    ]
    assert events[0]["method"] == "GET"
    assert events[0]["path"] == f"/v2/a/blobs/{layer}"


def test_tls_handshake_on_the_plain_port_is_refused_at_once(store):
    channel = RegistrySite(Registry(MemoryReactor(), store).resource()).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)
    assert transport.value().startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert transport.disconnecting


def test_a_url_that_is_not_utf8_gets_the_oci_error_not_a_traceback(store):
    status, headers, body = raw_exchange(
        store, b"GET /v2/library/%ff/manifests/v1 HTTP/1.1\r\nHost: n\r\n\r\n"
    )
    assert status == b"HTTP/1.1 400 Bad Request"
    assert headers[b"content-type"] == b"application/json"
    assert errors(body) == ["NAME_INVALID"]


def test_a_request_body_is_dropped_as_it_arrives_never_spooled(store, image):
    body = b"x" * (4 * 1024 * 1024)
    digest = digest_of(image.manifest)
    status, _, _ = raw_exchange(
        store,
        b"GET /v2/library/demo/manifests/%s?ns=registry.test HTTP/1.1\r\nHost: n\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (digest.encode(), len(body), body),
    )
    assert status == b"HTTP/1.1 200 OK"


def test_a_request_body_never_reaches_a_temporary_file(store, image, monkeypatch):
    def spool(length):
        raise AssertionError(f"Twisted was asked to keep a {length}-byte body")

    monkeypatch.setattr(twisted.web.http, "_getContentFile", spool)
    status, _, _ = raw_exchange(
        store,
        b"GET /v2/ HTTP/1.1\r\nHost: n\r\nContent-Length: 1000000\r\n\r\n" + b"y" * 1_000_000,
    )
    assert status == b"HTTP/1.1 200 OK"


AUTH = BasicAuth(b"spegel", b"s3cret:with colon")
GOOD = "Basic " + base64.b64encode(b"spegel:s3cret:with colon").decode()


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic " + base64.b64encode(b"spegel:wrong").decode(),
        "Basic " + base64.b64encode(b"other:s3cret:with colon").decode(),
        "Basic " + base64.b64encode(b"spegel").decode(),
        "Basic not-base64!",
        "Bearer " + base64.b64encode(b"spegel:s3cret:with colon").decode(),
        GOOD[:-2],
    ],
)
def test_without_the_credentials_every_v2_request_is_a_401(store, image, authorization):
    http = client(store, auth=AUTH)
    headers = {} if authorization is None else {"Authorization": authorization}
    tag = "/v2/library/demo/manifests/v1?ns=registry.test"
    for method, path in [("GET", "/v2/"), ("HEAD", tag), ("GET", tag), ("PUT", tag)] + [
        ("GET", p) for p in paths(image)
    ]:
        response = http.request(method, "http://node" + path, headers=headers).result
        assert response.code == 401, (method, path)
        assert response.headers.getRawHeaders("www-authenticate") == ['Basic realm="spegel-tx"']
        if method != "HEAD":
            assert errors(http.content(response).result) == ["UNAUTHORIZED"]
    assert store.opened == []


def test_with_the_credentials_requests_are_served(store, image):
    http = client(store, auth=AUTH)
    headers = {"Authorization": GOOD}
    assert http.get("http://node/v2/", headers=headers).result.code == 200
    tag = "http://node/v2/library/demo/manifests/v1?ns=registry.test"
    assert http.content(http.get(tag, headers=headers).result).result == image.index
    lower = {"Authorization": "basic " + GOOD.split()[1]}
    for path in paths(image):
        assert http.get("http://node" + path, headers=lower).result.code == 200


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
def test_probes_need_no_credentials(store, path):
    assert client(store, auth=AUTH).get("http://node" + path).result.code == 200
