"""Benchmarks of this machine: collectives (commbench), the host probes and the device's kernels."""
