import pytest
from hypothesis import given
from hypothesis import strategies as st

from spegel_tx.errors import InvalidDigest, InvalidReference
from spegel_tx.oci.digest import parse_digest
from spegel_tx.oci.reference import ImageName, parse_reference, split_image_name

DIGEST = "sha256:" + "ab" * 32


def test_tag_and_digest_references():
    ref = parse_reference("docker.io", "library/nginx", "1.27")
    assert (ref.tag, ref.digest, ref.name) == ("1.27", None, "docker.io/library/nginx:1.27")
    ref = parse_reference(None, "library/nginx", DIGEST)
    assert (ref.tag, ref.digest, ref.registry) == (None, DIGEST, None)


@pytest.mark.parametrize("repository", ["Library/nginx", "a//b", "-a", "a/", "a" * 256, "a b"])
def test_invalid_repositories(repository):
    with pytest.raises(InvalidReference):
        parse_reference(None, repository, "v1")


@pytest.mark.parametrize("tag", [".hidden", "a" * 129, "v1/2", "-x"])
def test_invalid_tags(tag):
    with pytest.raises(InvalidReference, match="tag"):
        parse_reference(None, "library/demo", tag)


@pytest.mark.parametrize("ns", ["", "a/b", "host?x", "x@y"])
def test_invalid_registry_in_ns(ns):
    with pytest.raises(InvalidReference, match="registry"):
        parse_reference(ns, "library/demo", "v1")


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:abc",
        "md5:" + "a" * 32,
        "sha256:" + "AB" * 32,
        "sha256" + "a" * 64,
        "sha512:" + "a" * 64,
    ],
)
def test_invalid_digests(digest):
    with pytest.raises(InvalidDigest):
        parse_digest(digest)


def test_sha512_digest():
    assert parse_digest("sha512:" + "a" * 128)


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("docker.io/library/nginx:1.27", ImageName("docker.io", "library/nginx", "1.27", None)),
        ("127.0.0.1:5000/demo:v1", ImageName("127.0.0.1:5000", "demo", "v1", None)),
        ("ghcr.io/o/app@" + DIGEST, ImageName("ghcr.io", "o/app", None, DIGEST)),
        ("ghcr.io/o/app:v2@" + DIGEST, ImageName("ghcr.io", "o/app", "v2", DIGEST)),
        ("localhost:5000/a/b", ImageName("localhost:5000", "a/b", None, None)),
    ],
)
def test_split_image_names(name, parts):
    assert split_image_name(name) == parts


@pytest.mark.parametrize("name", [DIGEST, "nginx", "docker.io/Library/x:1", "h/a@sha256:zz"])
def test_names_that_are_not_references(name):
    assert split_image_name(name) is None


@given(
    registry=st.from_regex(r"[a-z0-9]{1,10}(\.[a-z]{2,5})?(:[0-9]{1,5})?", fullmatch=True),
    repository=st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}", fullmatch=True),
    tag=st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}", fullmatch=True),
)
def test_reference_name_splits_back(registry, repository, tag):
    name = parse_reference(registry, repository, tag).name
    assert split_image_name(name) == ImageName(registry, repository, tag, None)
