"""One way to talk to a decoupled minedraft model over gRPC streaming: vllm_backend-style inputs,
and the responses of one request as they come. The client and the tests share it."""
import json
import queue

import numpy as np


def request_inputs(prompt: str, params, stream: bool = True, returns=()) -> list:
    """`params`: a dict, raw JSON text, or None (left out); `returns`: return_* flags to set."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

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


class StreamError(RuntimeError):
    """The server answered the request with an error response."""


def responses(url: str, model: str, inputs: list, timeout: float | None = None):
    """Yield each response that carries outputs (tritonclient InferResult) until the final one.
    Raises StreamError on an error response, queue.Empty after `timeout` seconds of silence.
    Leaving the loop early cancels the request."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    finished = False
    try:
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                finished = True
                raise StreamError(str(error))
            response = result.get_response()
            if response.outputs:
                yield result
            if response.parameters["triton_final_response"].bool_param:
                finished = True
                return
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()
