"""Tools beside the serving package: benchmarks, the simulator, repository and perf_analyzer helpers."""
