"""Model definitions and deterministic synthetic data."""
