"""Engine configuration: one validated value object, built once, never changed afterwards."""
import os
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ModeTraits:
    two_batches: bool  # PSD's layout: two internal batches, one drafted while the other is verified
    drafts: bool  # a draft model is loaded
    chooses_each_step: bool = False  # picks AR, SD or PSD every step, from costs calibrated at start-up


# The one table of what each serving mode needs; a step itself is always "ar", "sd" or "psd"
# (cost_model.STEP_MODES), chosen per step by flex (policy/flex.py) or by auto's batch-size rule (policy/auto.py).
MODE_TRAITS = {"ar": ModeTraits(two_batches=False, drafts=False), "sd": ModeTraits(two_batches=False, drafts=True),
               "psd": ModeTraits(two_batches=True, drafts=True),
               "flex": ModeTraits(two_batches=True, drafts=True, chooses_each_step=True),
               "auto": ModeTraits(two_batches=True, drafts=True, chooses_each_step=True)}
SERVING_MODES = tuple(MODE_TRAITS)
DRAFTER_KINDS = ("auto", "inline", "process")
DRAFT_METHODS = ("model", "ngram")
DTYPES = ("float32", "float16", "bfloat16")  # torch dtypes by name (model.loading maps them)
QUANTIZATIONS = ("none", "int8", "int4", "w8a8")  # of the linear layers (model/quantization.py)
CPU_QUANTIZATIONS = ("w8a8",)  # oneDNN's u8 x s8 GEMM: a CPU kernel only
# Weight formats inductor's C++ GEMM template takes frozen into a static step graph (W8A8 is an op of its own).
STATIC_STEP_QUANTIZATIONS = ("none", "int8", "int4")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "model_repository" / "minedraft" / "1"


BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)  # vLLM's choices, and the smaller ones tests use


class ConfigError(ValueError):
    """Invalid engine configuration; the message names the key."""


@dataclass(frozen=True)
class EngineConfig:
    target_model: str = str(DEFAULT_MODEL_DIR / "target")
    draft_model: str = str(DEFAULT_MODEL_DIR / "draft")
    mode: str = "psd"
    num_draft_tokens: int = 4  # flex, auto: the longest draft they may choose
    # FlexDraft's cut: a row stops drafting once the product of the draft's top-1 probabilities
    # falls below this (0: never). Any value is lossless; it only trades draft and verify work.
    draft_confidence_threshold: float = 0.0
    max_num_seqs: int = 16  # per internal batch: psd, flex and auto hold twice this many in flight
    max_model_len: int = 1024
    target_device: str = "cpu"
    draft_device: str = "cpu"
    dtype: str = "float32"
    # Weight-only quantization of the draft's linear layers at load (quantization.py): "none",
    # "int8" or "int4". Lossless whatever it is: only the target's distribution counts. On CPU a
    # quantized draft computes in bfloat16 whatever `dtype` says: torch's kernels are fast only there.
    draft_quantization: str = "none"
    # The same for the target (same names): the served model is then the quantized one, and
    # speculation is lossless relative to it. A target converted from a GGUF keeps the file's
    # 4-bit blocks as published under int4 (model/gguf_blocks.py; other layers int8).
    target_quantization: str = "none"
    # What proposes drafts: "model" (draft_model) or "ngram" (prompt lookup, drafting/ngram.py: the
    # tokens that followed the context's last n tokens earlier in it, n from prompt_lookup_max down
    # to prompt_lookup_min; mode sd only, no draft model).
    draft_method: str = "model"
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    # Where the drafter runs: "process" (its own worker process, the CPU way to overlap),
    # "inline" (same process; a CUDA stream on draft_device), or "auto".
    drafter: str = "auto"
    # CPU cores for each side, e.g. "0" or "0-1"; empty: a process drafter (psd, flex, auto on CPU)
    # gets half the cores, an inline one shares the target's.
    target_cpus: str = ""
    draft_cpus: str = ""
    # Ranks the target is sharded over (transformers' tensor-parallel plan): rank 0 in this process,
    # the others in worker processes it starts. On CUDA rank r runs on target_device's index + r.
    tensor_parallel_size: int = 1
    # vLLM's key: true runs transformers' eager forward. false runs Llama and Qwen2 models (target
    # and draft) through the compact forward under torch.compile (model/compact.py), compiled at
    # load; other architectures and tensor parallelism stay eager. True by default until the compiled path pays
    # (docs/benchmarks.md, "The compiled forward").
    enforce_eager: bool = True
    # vLLM's `compile_sizes`, on CPU: row counts (e.g. "1" or "1,2") whose target steps, an AR
    # step's 1 token a row and a verification's num_draft_tokens + 1, and whose one-token draft
    # steps each get a static-shape graph with the weights frozen in (model/compact.py,
    # StaticSteps): faster one-row steps, bf16 and weight-only int8/int4 alike, for minutes of
    # compiling at load and more copies of the weights (docs/benchmarks.md). Needs enforce_eager
    # false, a target on CPU, target_ and draft_quantization none, int8 or int4, tensor_parallel_size 1.
    compile_sizes: str = ""
    # The KV cache is a pool of blocks per model (model/kv_cache.py), vLLM's keys: positions a block;
    # the pool's bytes, the target's and the draft's together (0: room for 4,096 tokens a row, or
    # max_model_len if less, for every row in flight); whether requests share cached prefixes.
    block_size: int = 16
    kv_cache_memory_bytes: int = 0
    enable_prefix_caching: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown engine parameter(s): {', '.join(unknown)}")
        parsed = {}
        for key, value in values.items():
            default = getattr(cls, key)
            try:
                parsed[key] = _read_bool(value) if isinstance(default, bool) else type(default)(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: cannot read {value!r} as {type(default).__name__}") from None
        config = cls(**parsed)
        config.validate()
        return config

    def validate(self) -> None:
        if self.mode not in SERVING_MODES:
            raise ConfigError(f"mode must be one of {SERVING_MODES}, got {self.mode!r}")
        if not 0 <= self.num_draft_tokens <= 16:
            raise ConfigError(f"num_draft_tokens must be in [0, 16], got {self.num_draft_tokens}")
        if self.traits.chooses_each_step and self.num_draft_tokens == 0:
            raise ConfigError(f"mode {self.mode} needs num_draft_tokens >= 1: it is the longest draft it may choose")
        if not 0 <= self.draft_confidence_threshold < 1:
            raise ConfigError(f"draft_confidence_threshold must be in [0, 1), got {self.draft_confidence_threshold}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.kv_cache_memory_bytes < 0:
            raise ConfigError(f"kv_cache_memory_bytes must be >= 0, got {self.kv_cache_memory_bytes}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for key, device in (("draft_quantization", self.draft_device), ("target_quantization", self.target_device)):
            if getattr(self, key) not in QUANTIZATIONS:
                raise ConfigError(f"{key} must be one of {QUANTIZATIONS}, got {getattr(self, key)!r}")
            if getattr(self, key) in CPU_QUANTIZATIONS and device != "cpu":
                raise ConfigError(f"{key} {getattr(self, key)} has CPU kernels only; on {device} use int4 or int8")
        if self.drafter not in DRAFTER_KINDS:
            raise ConfigError(f"drafter must be one of {DRAFTER_KINDS}, got {self.drafter!r}")
        for key in ("target_device", "draft_device"):
            device = getattr(self, key)
            if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
                raise ConfigError(f"{key} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        for key in ("target_cpus", "draft_cpus"):
            parse_cpus(getattr(self, key), key)
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.target_quantization != "none":
            raise ConfigError("target_quantization needs tensor_parallel_size 1: the ranks load their shards unquantized")
        if self.tensor_parallel_size > 1 and self.target_model.endswith(".gguf"):
            raise ConfigError("tensor_parallel_size > 1 needs target_model as an HF model directory, not a .gguf file")
        self._validate_compile_sizes()
        if self.draft_method not in DRAFT_METHODS:
            raise ConfigError(f"draft_method must be one of {DRAFT_METHODS}, got {self.draft_method!r}")
        if self.draft_method == "ngram":
            if self.mode != "sd":
                raise ConfigError(f"draft_method ngram drafts in mode sd only (no model to run beside the "
                                  f"target or to calibrate), got mode {self.mode!r}")
            if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
                raise ConfigError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                                  f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        model_keys = ("target_model", "draft_model") if self.draft_method == "model" else ("target_model",)
        for key in model_keys:
            path = getattr(self, key)
            if not ((Path(path) / "config.json").is_file() or (path.endswith(".gguf") and Path(path).is_file())):
                raise ConfigError(f"{key}: neither an HF model directory (config.json) nor a .gguf file: {path!r}")

    def _validate_compile_sizes(self) -> None:
        sizes = self.static_step_rows
        if not sizes:
            return
        if any(not 1 <= rows <= self.max_num_seqs for rows in sizes):
            raise ConfigError(f"compile_sizes are row counts in [1, max_num_seqs = {self.max_num_seqs}], "
                              f"got {self.compile_sizes!r}")
        needs = {"enforce_eager false": not self.enforce_eager, "target_device cpu": self.target_device == "cpu",
                 "target_quantization none, int8 or int4": self.target_quantization in STATIC_STEP_QUANTIZATIONS,
                 "draft_quantization none, int8 or int4": self.draft_quantization in STATIC_STEP_QUANTIZATIONS
                 or not self.runs_draft_model,
                 "tensor_parallel_size 1": self.tensor_parallel_size == 1}
        missing = [what for what, holds in needs.items() if not holds]
        if missing:
            raise ConfigError(f"compile_sizes needs {', '.join(missing)} (static CPU graphs)")

    @property
    def static_step_rows(self) -> tuple[int, ...]:
        """compile_sizes as row counts."""
        try:
            return tuple(sorted({int(part) for part in self.compile_sizes.replace(" ", "").split(",") if part}))
        except ValueError:
            raise ConfigError(f"compile_sizes: want row counts such as '1' or '1,2', got {self.compile_sizes!r}") from None

    @property
    def static_step_shapes(self) -> tuple[tuple[int, int], ...]:
        """The target's (rows, tokens) step shapes compile_sizes asks for: AR and verification."""
        tokens = sorted({1, 1 if self.mode == "ar" else self.num_draft_tokens + 1})
        return tuple((rows, n) for rows in self.static_step_rows for n in tokens)

    @property
    def runs_draft_model(self) -> bool:
        """Whether a draft model runs: a mode that drafts, with a model (not prompt lookup)."""
        return self.traits.drafts and self.draft_method == "model"

    @property
    def traits(self) -> ModeTraits:
        return MODE_TRAITS[self.mode]

    @property
    def num_batches(self) -> int:
        return 2 if self.traits.two_batches else 1

    @property
    def drafter_kind(self) -> str:
        if self.drafter != "auto":
            return self.drafter
        overlaps_on_cpu = self.traits.two_batches and self.draft_device == "cpu"
        return "process" if overlaps_on_cpu else "inline"

    def cpu_split(self) -> tuple[set[int], set[int]]:
        """Cores for (target, drafter). An overlapping drafter gets its own cores."""
        available = sorted(os.sched_getaffinity(0))
        target = parse_cpus(self.target_cpus, "target_cpus")
        draft = parse_cpus(self.draft_cpus, "draft_cpus")
        if self.drafter_kind == "process" and len(available) > 1:
            half = len(available) // 2
            return target or set(available[:half]), draft or set(available[half:])
        return target or set(available), draft or target or set(available)


def parse_cpus(spec: str, key: str) -> set[int]:
    """'0', '0-3' or '0,2' -> {cores}; empty -> empty set."""
    cpus = set()
    try:
        for part in filter(None, spec.replace(" ", "").split(",")):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ConfigError(f"{key}: expected cores like '0', '0-3' or '0,2', got {spec!r}") from None
    return cpus


def _read_bool(value) -> bool:
    """A boolean from config.pbtxt's strings ("true", "false", "1", "0") or a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return text in ("true", "1")
