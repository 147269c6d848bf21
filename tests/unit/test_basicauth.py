"""Credentials read from a mounted Secret's files, checked and sent."""

import base64
from pathlib import Path

import pytest
from twisted.internet.defer import succeed

from spegel_tx import basicauth
from spegel_tx.basicauth import AuthorizedClient, BasicAuth, read_basic_auth
from spegel_tx.config import basic_auth, load_config
from spegel_tx.errors import ConfigError


def secret(tmp_path: Path, username: bytes | None, password: bytes | None) -> tuple[str, str]:
    paths = []
    for name, value in (("username", username), ("password", password)):
        path = tmp_path / name
        if value is not None:
            path.write_bytes(value)
        paths.append(str(path))
    return paths[0], paths[1]


def test_the_secret_files_give_the_header_containerd_and_peers_send(tmp_path):
    auth = read_basic_auth(*secret(tmp_path, b"spegel\n", b"pa:ss\r\n"))
    assert auth == BasicAuth(b"spegel", b"pa:ss")
    assert auth.header() == b"Basic " + base64.b64encode(b"spegel:pa:ss")
    assert auth.admits(auth.header())


def test_a_username_alone_is_credentials_with_an_empty_password(tmp_path):
    username, password = secret(tmp_path, b"spegel", b"")
    assert read_basic_auth(username, password) == BasicAuth(b"spegel", b"")


def test_empty_files_or_empty_paths_mean_no_authentication(tmp_path):
    assert read_basic_auth(*secret(tmp_path, b"", b"")) is None
    assert read_basic_auth("", "") is None


def test_spegels_paths_may_be_missing_and_then_there_is_no_authentication(tmp_path, monkeypatch):
    missing = tmp_path / "not-mounted"
    monkeypatch.setattr(basicauth, "DEFAULT_USERNAME_FILE", str(missing / "username"))
    monkeypatch.setattr(basicauth, "DEFAULT_PASSWORD_FILE", str(missing / "password"))
    assert read_basic_auth(str(missing / "username"), str(missing / "password")) is None


def test_a_path_set_by_the_operator_must_exist(tmp_path):
    username, _ = secret(tmp_path, b"spegel", None)
    with pytest.raises(ConfigError) as raised:
        read_basic_auth(username, str(tmp_path / "pasword"))
    assert raised.value.key == "basic-auth-password-file"
    assert "pasword does not exist" in raised.value.problem


def test_a_username_with_a_colon_is_refused(tmp_path):
    with pytest.raises(ConfigError) as raised:
        read_basic_auth(*secret(tmp_path, b"a:b", b"c"))
    assert raised.value.key == "basic-auth-username-file"


def test_the_node_reads_its_credentials_from_its_configuration(tmp_path):
    username, password = secret(tmp_path, b"u", b"p")
    config = load_config(
        environ={"BASIC_AUTH_USERNAME_FILE": username, "BASIC_AUTH_PASSWORD_FILE": password}
    )
    assert basic_auth(config) == BasicAuth(b"u", b"p")
    assert config.basic_auth_username_file == username
    default = load_config(environ={})
    assert default.basic_auth_username_file == "/etc/secrets/basic-auth/username"
    assert default.basic_auth_password_file == "/etc/secrets/basic-auth/password"


class Recording:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict]] = []

    def request(self, method, url, **kwargs):
        self.sent.append((method, url, kwargs))
        return succeed(None)


def test_a_peer_request_carries_the_credentials_and_keeps_its_own_headers():
    inner = Recording()
    client = AuthorizedClient(inner, BasicAuth(b"u", b"p"))
    mirrored = {b"x-spegel-mirrored": [b"true"]}
    client.request("GET", "http://peer/v2/x", headers=mirrored, unbuffered=True)
    [(method, url, kwargs)] = inner.sent
    assert (method, url) == ("GET", "http://peer/v2/x")
    assert kwargs["headers"] == {
        b"x-spegel-mirrored": [b"true"],
        b"authorization": [b"Basic " + base64.b64encode(b"u:p")],
    }
    assert kwargs["unbuffered"] is True
    assert mirrored == {b"x-spegel-mirrored": [b"true"]}, "the caller's headers are not changed"
