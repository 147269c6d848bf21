from twisted.application.service import ServiceMaker

spegel = ServiceMaker(
    "spegel-tx",
    "spegel_tx.tap",
    "Cluster-local OCI registry mirror serving the node's containerd content.",
    "spegel",
)
