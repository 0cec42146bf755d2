"""Test helpers shipped with the package (multi-process harness)."""
