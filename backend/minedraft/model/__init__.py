"""Models and what runs them: loading, the model runner (one padded forward over rows of a KV
cache), the KV cache, the sampler and acceptance rule (pure functions over tensors), weight-only
quantization, and tensor parallelism with its worker ranks.

Owns: weights, KV memory and forwards; never decides who runs. May import only the root's shared
types and `worker_process`.
"""
