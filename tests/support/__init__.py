"""Real processes and real images for the integration tests, benchmarks and demos.

Addresses: every test must pass while another copy of the suite runs on the same
machine, so nothing listens on a fixed address or port. Take the address from
``loopback.loopback_host()`` (a 127.a.b.c no other run on the machine holds, a new
one per call) and the ports from ``processes.free_ports(host, n)``, or bind port 0
and read the port back. ``Containerd.node_keys(host)``, the ``spegel_node`` fixture,
``DockerRegistry`` and ``MirrorCluster`` already do.

Code under test: ``processes.start_spegel`` and ``spegel_tx_cli`` run the working
tree's code (``PYTHONPATH``); with ``SPEGEL_TX_CODE=installed`` (the demo sets it),
what the running interpreter has installed, from outside the tree.

``install.sh`` holds the shell functions with which ``tests/run.sh`` and
``deploy/examples/demo.sh`` install what a fresh Debian machine lacks.
"""
