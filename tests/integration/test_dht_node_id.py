"""Node ids over real restarts: `twistd -n spegel` keeps its 256-bit id in ``data-dir``.

Read the way an operator would: the node's own id from ``GET /debug/peers`` on its
metrics address, and the id another node holds for it in that node's table.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.loopback import loopback_host
from tests.support.processes import poll, stop_process

pytestmark = pytest.mark.integration

NODE_ID_FILE = "node-id"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def debug_peers(node: Any) -> dict[str, Any]:
    return get_json(f"{node.metrics_url}/debug/peers")


def ids_at(witness: Any, host: str) -> dict[str, str]:
    """``host:port`` -> node id, for every contact at ``host`` in the witness's table."""
    return {
        f"{peer['host']}:{peer['port']}": peer["node_id"]
        for peer in debug_peers(witness)["peers"]
        if peer["host"] == host
    }


def test_node_with_data_dir_keeps_its_id_across_a_restart(
    spegel_node: Callable[..., Any], containerd: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "spegel-data"
    id_file = data_dir / NODE_ID_FILE
    restarted_host = loopback_host()

    first = spegel_node(containerd, host=restarted_host, wait_ready=False, data_dir=str(data_dir))
    node_id = debug_peers(first)["node_id"]
    assert re.fullmatch(r"[0-9a-f]{64}", node_id), "a 256-bit id, as 64 hex digits"
    assert id_file.read_text().strip() == node_id, "the id is written to data-dir"

    witness = spegel_node(
        containerd,
        wait_ready=False,
        static_bootstrap_peers=first.router_address,
    )
    assert poll(lambda: ids_at(witness, restarted_host)) == {first.router_address: node_id}

    stop_process(first.process)
    assert first.process.returncode is not None

    restarted = spegel_node(
        containerd,
        host=restarted_host,
        wait_ready=False,
        data_dir=str(data_dir),
        static_bootstrap_peers=witness.router_address,
    )
    assert debug_peers(restarted)["node_id"] == node_id
    assert id_file.read_text().strip() == node_id, "the id file is read, not rewritten"
    assert poll(lambda: debug_peers(restarted)["ready"]), "it rejoined through the witness"

    # The witness hears the restarted node on its new router port: the contact it holds
    # for that host is refreshed from the restarted node's own datagrams, under the old id.
    # (Were the id new, the witness would hold two ids for the host, or a new one.)
    assert poll(lambda: restarted.router_address in ids_at(witness, restarted_host))
    assert ids_at(witness, restarted_host) == {restarted.router_address: node_id}


def test_node_without_data_dir_draws_a_new_id_on_every_start(
    spegel_node: Callable[..., Any], containerd: Any
) -> None:
    host = loopback_host()
    first = spegel_node(containerd, host=host, wait_ready=False)
    first_id = debug_peers(first)["node_id"]
    stop_process(first.process)
    second = spegel_node(containerd, host=host, wait_ready=False)
    second_id = debug_peers(second)["node_id"]

    assert re.fullmatch(r"[0-9a-f]{64}", first_id)
    assert re.fullmatch(r"[0-9a-f]{64}", second_id)
    assert second_id != first_id
    for node in (first, second):
        assert not (node.log_path.parent / NODE_ID_FILE).exists(), "nothing kept in the cwd"
