"""Real processes and real images for the integration tests and benchmarks."""
