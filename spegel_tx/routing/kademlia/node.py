"""Node ids and key ids: 256-bit, compared by XOR distance."""

from __future__ import annotations

import hashlib
import os
import string
import tempfile

from spegel_tx.routing.kademlia.messages import ID_LENGTH

NODE_ID_FILE = "node-id"


def random_node_id() -> bytes:
    return os.urandom(ID_LENGTH)


def key_id(key: str) -> bytes:
    """Where a key lives in the id space: ``sha256:<hex>`` and ``registry/repo:tag`` alike."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def distance(a: bytes, b: bytes) -> int:
    """Kademlia's metric: the XOR of the two ids read as big-endian integers."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def shared_prefix_length(a: bytes, b: bytes) -> int:
    """How many leading bits two ids share: 256 for equal ids."""
    return len(a) * 8 - distance(a, b).bit_length()


def load_or_create_node_id(data_dir: str) -> bytes:
    """A node restarted with the same ``data-dir`` keeps its id, and so its place in the DHT.

    An empty ``data_dir`` means no persistence: a fresh id per start.
    """
    if not data_dir:
        return random_node_id()
    path = os.path.join(data_dir, NODE_ID_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return _create_node_id(data_dir, path)
    return _parse_node_id(raw, path)


def _parse_node_id(raw: bytes, path: str) -> bytes:
    """Strict: a file that is not exactly 64 hex digits (plus whitespace) is refused,
    since guessing would silently move the node elsewhere in the DHT."""
    text = raw.strip()
    if len(text) != ID_LENGTH * 2 or not all(chr(c) in string.hexdigits for c in text):
        raise ValueError(f"{path} does not hold a {ID_LENGTH * 2}-character hex node id")
    return bytes.fromhex(text.decode("ascii"))


def _create_node_id(data_dir: str, path: str) -> bytes:
    """Write to a temporary file and rename it, so a crash never leaves a half-written id."""
    os.makedirs(data_dir, exist_ok=True)
    node_id = random_node_id()
    fd, temporary = tempfile.mkstemp(dir=data_dir, prefix=f".{NODE_ID_FILE}.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(node_id.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return node_id
