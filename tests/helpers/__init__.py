"""Test helpers: the multi-process harness, a recording timer, simulator fakes."""
