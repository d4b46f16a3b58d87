"""Client-side helpers shared by the tests that talk to a real tritonserver."""
import json

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype


def stream_inputs(prompt: str, params, stream: bool = True, returns=()) -> list:
    """vllm_backend-style inputs; `params` is a dict, raw JSON text, or None (left out); `returns`:
    the return_* flags to set."""
    def tensor(name, array):
        t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        return t
    tensors = [tensor("text_input", np.array([[prompt.encode()]], dtype=np.object_)),
               tensor("stream", np.array([[stream]]))]
    if params is not None:
        raw = params if isinstance(params, str) else json.dumps(params)
        tensors.append(tensor("sampling_parameters", np.array([[raw.encode("utf-8", "replace")]], dtype=np.object_)))
    tensors += [tensor(flag, np.array([[True]])) for flag in returns]
    return tensors

