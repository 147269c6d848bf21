from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from spegel_tx.containerd.store import ContainerdStore


def wait_until_ready(store: ContainerdStore, timeout: float = 20.0) -> None:
    deadline = reactor.seconds() + timeout
    while not store.ready():
        assert reactor.seconds() < deadline, "ContainerdStore never became ready"
        pytest_twisted.blockon(deferLater(reactor, 0.05))


@pytest.fixture(scope="module")
def containerd_store(containerd) -> Iterator[ContainerdStore]:
    store = ContainerdStore(
        reactor, containerd.address, containerd.namespace, containerd.content_path
    )
    store.startService()
    wait_until_ready(store)
    yield store
    store.stopService()
