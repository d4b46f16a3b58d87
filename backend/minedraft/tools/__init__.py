"""The top layer: the `minedraft` command (`cli`: serve, bench, simulate, eval-draft), the models'
preparation from PyPI (`prepare_models`), benchmarks, the simulator, the GPU check, and repository
and perf_analyzer helpers. May import every other part of the package; nothing imports from here.
"""
