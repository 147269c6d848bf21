"""spegel-tx: a stateless, cluster-local OCI registry mirror on Twisted."""

__version__ = "0.1.0"
