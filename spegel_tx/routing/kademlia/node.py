"""Node ids and key ids: 256-bit, compared by XOR distance."""

from __future__ import annotations

import hashlib
import os
import tempfile

from spegel_tx.routing.kademlia.messages import ID_LENGTH


def random_node_id() -> bytes:
    return os.urandom(ID_LENGTH)


def key_id(key: str) -> bytes:
    """Where a key lives in the id space: ``sha256:<hex>`` and ``registry/repo:tag`` alike."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def load_or_create_node_id(data_dir: str) -> bytes:
    """A node restarted with the same ``data-dir`` keeps its id, and so its place in the DHT."""
    if not data_dir:
        return random_node_id()
    path = os.path.join(data_dir, "node-id")
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        os.makedirs(data_dir, exist_ok=True)
        node_id = random_node_id()
        fd, temporary = tempfile.mkstemp(dir=data_dir, prefix=".node-id.")
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(node_id.hex() + "\n")
        os.replace(temporary, path)
        return node_id
    try:
        node_id = bytes.fromhex(text)
    except ValueError:
        node_id = b""
    if len(node_id) != ID_LENGTH:
        raise ValueError(f"{path} does not hold a {ID_LENGTH * 2}-character hex node id")
    return node_id
