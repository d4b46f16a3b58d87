"""The CPU matmul kernels at a step's shapes: what one linear layer costs in each weight format as
the input grows from one row (an AR step) to a verification's rows x (k + 1) tokens.

    python -m minedraft.tools.bench_kernels [--shape 1536 8960] [--rows 1 2 4 5 8 10 20 40]

Formats: bfloat16 through `F.linear`, bfloat16 packed for oneDNN (model/packed_linear.py), the
weight-only int8 and int4 layers of model/quantization.py on torch's own kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), and its W8A8 layer (int8 weights, activations
quantized per row, oneDNN's u8 x s8 GEMM), and bfloat16, int8 and int4 frozen into a static-shape
graph, where inductor's max-autotune picks its C++ GEMM template or torch's kernel
(`compile_sizes`). `--layers` copies of the layer run in turn, so that the weights stream from
memory as a model's do. Prints JSON: ms a layer and the weights' read rate.
"""
import argparse
import json
import sys
import time

import torch
from torch import nn

from minedraft.model.compact import STATIC_STEP_INDUCTOR_CONFIG
from minedraft.model.packed_linear import PackedLinear
from minedraft.model.quantization import (
    MAX_QUANTIZED_ROWS,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
)


def layer_ms(layers, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            for layer in layers:
                layer(x)
        started = time.perf_counter()
        for _ in range(repeats):
            for layer in layers:
                layer(x)
    return (time.perf_counter() - started) / repeats / len(layers) * 1000


class QuantizedKernel(nn.Module):
    """A weight-only layer's own kernel at every width (the layer itself switches to its
    bfloat16 weights above MAX_QUANTIZED_ROWS rows)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer.quantized_matmul(x)


class FrozenGemms(nn.Module):
    """Every layer's product of one input, compiled as one static-shape graph with the weights
    frozen in, as `compile_sizes`' step graphs are (inductor's max-autotune C++ GEMM template)."""

    def __init__(self, linears):
        super().__init__()
        self.linears = nn.ModuleList(linears)
        self.compiled = torch.compile(self._products, fullgraph=True, dynamic=False)

    def _products(self, x):
        return [linear(x) for linear in self.linears]

    def forward(self, x):
        with torch._inductor.config.patch(STATIC_STEP_INDUCTOR_CONFIG):
            return self.compiled(x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[1536, 8960], metavar=("IN", "OUT"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 5, 8, 10, 20, 40])
    parser.add_argument("--layers", type=int, default=8, help="copies, so that the weights outgrow the caches")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    in_features, out_features = args.shape
    torch.manual_seed(0)
    linears = [nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16) for _ in range(args.layers)]
    int8 = [QuantizedKernel(Int8WeightOnlyLinear(linear)) for linear in linears]
    int4 = [QuantizedKernel(Int4WeightOnlyLinear(linear)) for linear in linears]
    formats = {
        "bf16 F.linear": (linears, 2),
        "bf16 packed": ([PackedLinear(linear.weight, None) for linear in linears], 2),
        "int8 _weight_int8pack_mm": (int8, 1),
        "int4 _weight_int4pack_mm_for_cpu": (int4, 0.5),
        "w8a8 onednn qlinear": ([Int8DynamicLinear(linear) for linear in linears], 1),
        "bf16 frozen, C++ GEMM template": ([FrozenGemms(linears)], 2),
        "int8 frozen, C++ GEMM template": ([FrozenGemms(int8)], 1),
        "int4 frozen, C++ GEMM template": ([FrozenGemms(int4)], 0.5),
    }
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(args.rows))
    weight_bytes = in_features * out_features
    report = {"shape": args.shape, "layers": args.layers, "threads": torch.get_num_threads(),
              "max_quantized_rows": MAX_QUANTIZED_ROWS, "ms": {}, "gb_s": {}}
    for rows in args.rows:
        x = torch.randn(rows, in_features).to(torch.bfloat16)
        for name, (layers, bytes_per_weight) in formats.items():
            # A FrozenGemms runs every layer in one call.
            ms = layer_ms(layers, x, args.repeats) * len(layers) / args.layers
            report["ms"].setdefault(name, {})[rows] = round(ms, 3)
            report["gb_s"].setdefault(name, {})[rows] = round(weight_bytes * bytes_per_weight / ms / 1e6, 1)
        print(rows, {name: times[rows] for name, times in report["ms"].items()}, file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
