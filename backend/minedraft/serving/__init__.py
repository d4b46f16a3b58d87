"""Serving through Triton: the adapter Triton loads (`triton_model`, translation only), the
serving loop beside it (admission, engine and sender threads, cancellation; no Triton
dependency), request parsing (vllm_backend's tensor contract), Prometheus metrics, and the
launcher that assembles and supervises `tritonserver`.

May import everything below it (`engine` and the root's types); only `tools` imports from here.
"""
