"""Stage timing (NVTX + CUDA events / perf_counter), telemetry, trace writing and the runner."""
