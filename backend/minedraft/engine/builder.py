"""Building an engine's parts from its config: models, drafters, cores, the vocabulary and context
checks, the batches and the policy (with flex's start-up calibration). The Engine keeps the step."""
import logging
import os
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from minedraft.config import ConfigError, EngineConfig
from minedraft.drafting.coordinator import Drafting
from minedraft.drafting.draft_model import PARALLEL_DRAFT_KEY, build_draft_model
from minedraft.drafting.inline import InlineDrafter
from minedraft.drafting.ngram import NgramDrafter
from minedraft.drafting.process import ProcessDrafter
from minedraft.drafting.vocabulary import D2T_FILE, DraftVocabulary
from minedraft.engine.output import OutputBuilder
from minedraft.model.kv_cache import PagedKVCache, PoolSpec
from minedraft.model.loading import TORCH_DTYPES, load_config, load_model, load_tokenizer
from minedraft.model.quantization import quantize_target
from minedraft.model.runner import ModelRunner
from minedraft.model.tensor_parallel import TensorParallelRunner, rank_device
from minedraft.policy.auto import AutoPolicy
from minedraft.policy.calibration import measure_step_costs
from minedraft.policy.cost_model import Choice
from minedraft.policy.fixed import Policy
from minedraft.policy.flex import FlexPolicy
from minedraft.scheduler import Batch, Scheduler

log = logging.getLogger("minedraft")

# The default pool's tokens a row in flight (kv_cache_memory_bytes 0): the shipped context before
# the pool, so that the default's memory is at most what it was (but one request always fits).
DEFAULT_TOKENS_PER_ROW = 4096


@dataclass
class EngineParts:
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    max_prompt_chars: int  # longer prompts are refused before tokenizing (see build)
    target: ModelRunner
    target_caches: list[PagedKVCache]  # one per internal batch, by slot, over the target's pool
    scheduler: Scheduler
    drafting: Drafting
    policy: Policy
    outputs: OutputBuilder
    # The cores of the thread that runs steps (`target_cpus`; empty: not pinned).
    step_cpus: set[int]


def build(config: EngineConfig) -> EngineParts:
    tokenizer = load_tokenizer(config.target_model)
    eos_token_ids = end_of_sequence_ids(config.target_model, tokenizer)
    target_vocab_size = load_config(config.target_model).vocab_size
    target_cpus, draft_cpus = config.cpu_split() if config.target_device == "cpu" else (set(), set())
    # A row holds the context plus one verification's drafts and its extra token.
    capacity = config.max_model_len + config.num_draft_tokens + 2
    target_pool, draft_pool = pool_specs(config, capacity)
    drafter = None
    if config.traits.drafts and config.num_draft_tokens > 0:
        drafter = (NgramDrafter(config.prompt_lookup_min, config.prompt_lookup_max) if config.draft_method == "ngram"
                   else _start_drafter(config, tokenizer, eos_token_ids, target_vocab_size, capacity, draft_cpus,
                                       draft_pool))
    # Flex's and auto's sequential (SD) steps draft in-process: with nothing to overlap, a round
    # trip to the worker process costs more than it hides.
    sequential_drafter = drafter
    if config.traits.chooses_each_step and isinstance(drafter, ProcessDrafter):
        sequential_drafter = InlineDrafter(build_draft_model(
            config.draft_model, config.draft_device, config.dtype, config.max_num_seqs, capacity,
            eos_token_ids, target_vocab_size, config.draft_quantization, config.enforce_eager, draft_pool,
            config.static_step_rows))
    step_cpus = target_cpus if config.target_cpus else set()
    unpinned = os.sched_getaffinity(0)
    _pin_target(config, target_cpus)  # the start-up calibration times the target on its own cores
    try:
        target = _start_target(config, capacity, target_cpus, target_pool)
        check_context(target.model.config, config)
        batches = [Batch(slot, config.max_num_seqs) for slot in range(config.num_batches)]
        target_caches = [target.new_cache() for _ in batches]
        drafting = Drafting(drafter, sequential_drafter, batches, config.max_model_len,
                            config.draft_confidence_threshold)
        policy = _make_policy(config, target, target_caches[0], drafting, eos_token_ids)
        target_caches[0].reset()  # the calibration's scratch rows
    finally:
        # The thread that runs steps pins itself (Engine); the building one, whose later threads
        # serve requests and responses, is let go again.
        os.sched_setaffinity(0, unpinned)
    # No token is longer than the longest in the vocabulary, so a prompt of more characters than
    # this has more than max_model_len tokens, whatever it says.
    max_prompt_chars = config.max_model_len * longest_token_chars(tokenizer)
    return EngineParts(tokenizer=tokenizer, eos_token_ids=eos_token_ids, max_prompt_chars=max_prompt_chars,
                       target=target, target_caches=target_caches, scheduler=Scheduler(batches), drafting=drafting,
                       policy=policy, outputs=OutputBuilder(tokenizer, eos_token_ids, config.max_model_len),
                       step_cpus=step_cpus)


def _start_target(config: EngineConfig, capacity: int, cpus: set[int], pool: PoolSpec):
    if config.tensor_parallel_size == 1:
        model = load_model(config.target_model, config.target_device, config.dtype)
        if config.target_quantization != "none":
            quantize_target(model, config.target_quantization, config.target_model)
        return ModelRunner(model, config.max_num_seqs, capacity, enforce_eager=config.enforce_eager, pool=pool,
                           static_shapes=config.static_step_shapes)
    check_tensor_parallel(load_config(config.target_model), config)
    return TensorParallelRunner(config.target_model, config.target_device, config.dtype, config.tensor_parallel_size,
                                config.max_num_seqs, capacity, cpus, pool)


def kv_bytes_per_token(model_config, dtype: str) -> int:
    """Keys and values of every layer for one position."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return 2 * model_config.num_hidden_layers * kv_heads * head_dim * TORCH_DTYPES[dtype].itemsize


def pool_specs(config: EngineConfig, capacity: int) -> tuple[PoolSpec, PoolSpec]:
    """The target's and the draft's KV pools. They hold the same tokens: `kv_cache_memory_bytes`
    is split by their bytes a token. The draft's has twice the blocks: a batch's rows that left
    hand their draft blocks back only at its next drafting, so the rows of one batch may still
    hold what new requests of the other need (on the CPU the unused half is never mapped in)."""
    rows = config.num_batches * config.max_num_seqs
    block_size = config.block_size
    one_request = -(-capacity // block_size)
    if config.kv_cache_memory_bytes:
        per_token = kv_bytes_per_token(load_config(config.target_model), config.dtype)
        if config.runs_draft_model:
            per_token += kv_bytes_per_token(load_config(config.draft_model), config.dtype)
        num_blocks = config.kv_cache_memory_bytes // per_token // block_size
    else:  # and never less than one whole request
        num_blocks = max(rows * -(-min(capacity, DEFAULT_TOKENS_PER_ROW) // block_size), one_request)
    if num_blocks < one_request:
        raise ConfigError(f"kv_cache_memory_bytes {config.kv_cache_memory_bytes} holds {num_blocks} blocks of "
                          f"{block_size} tokens; one request may need {capacity} tokens (max_model_len "
                          f"{config.max_model_len} plus a verification's drafts)")
    spare = rows * -(-(config.num_draft_tokens + 2) // block_size)
    return (PoolSpec(num_blocks, block_size, config.enable_prefix_caching),
            PoolSpec(2 * num_blocks + spare, block_size, config.enable_prefix_caching))


def _start_drafter(config, tokenizer, eos_token_ids, target_vocab_size, capacity, draft_cpus, pool):
    draft_config = load_config(config.draft_model)
    check_vocabularies(tokenizer, config.draft_model, target_vocab_size, draft_config.vocab_size,
                       is_parallel=getattr(draft_config, PARALLEL_DRAFT_KEY, None) is not None)
    check_context(draft_config, config)
    if config.drafter_kind == "process":
        return ProcessDrafter(config.draft_model, config.draft_device, config.dtype, config.max_num_seqs, capacity,
                              eos_token_ids, target_vocab_size, config.num_draft_tokens, draft_cpus,
                              quantization=config.draft_quantization, enforce_eager=config.enforce_eager, pool=pool,
                              static_step_rows=config.static_step_rows)
    return InlineDrafter(build_draft_model(config.draft_model, config.draft_device, config.dtype,
                                           config.max_num_seqs, capacity, eos_token_ids, target_vocab_size,
                                           config.draft_quantization, config.enforce_eager, pool,
                                           config.static_step_rows))


def _make_policy(config, target, cache, drafting, eos_token_ids) -> Policy:
    if not config.traits.chooses_each_step:
        return Policy(Choice(config.mode, config.num_draft_tokens if config.traits.drafts else 0))
    costs = measure_step_costs(target, cache, drafting.sequential_drafter, config.num_draft_tokens,
                               config.max_num_seqs, eos_token_ids, overlap_drafter=drafting.drafter)
    log.info("%s calibration: %s", config.mode, costs.to_json())
    if config.mode == "auto":
        return AutoPolicy(config.num_draft_tokens, costs, config.max_num_seqs, 2 * config.max_num_seqs,
                             drafting.drafter.overlaps)
    return FlexPolicy(config.num_draft_tokens, costs, config.max_num_seqs)


def _pin_target(config: EngineConfig, cpus: set[int]) -> None:
    """Size the target's thread pool to its share of cores. The affinity is only set when
    configured (and only while building: see build)."""
    if not cpus:
        return
    torch.set_num_threads(len(cpus))
    if config.target_cpus:
        os.sched_setaffinity(0, cpus)


def check_vocabularies(tokenizer, draft_path: str, target_vocab_size: int, draft_vocab_size: int,
                       is_parallel: bool = False) -> None:
    vocabulary = DraftVocabulary.load(draft_path, target_vocab_size)
    if vocabulary.d2t is not None:
        # A reduced draft vocabulary: its ids map into the target's, plus at most one input-only id
        # for unmapped tokens and, in a parallel draft, its mask token.
        if not vocabulary.size <= draft_vocab_size <= vocabulary.size + 1 + is_parallel:
            raise ConfigError(f"draft_model: {D2T_FILE} maps {vocabulary.size} ids but the draft has "
                              f"{draft_vocab_size}")
        if int(vocabulary.d2t.max()) >= target_vocab_size or int(vocabulary.d2t.min()) < 0:
            raise ConfigError(f"draft_model: {D2T_FILE} names ids outside the target's vocabulary")
    elif target_vocab_size != draft_vocab_size:
        raise ConfigError(f"draft_model: vocabulary size {draft_vocab_size} differs from the target's "
                          f"{target_vocab_size}; the pair must share a tokenizer")
    try:
        draft_tokenizer = load_tokenizer(draft_path)
    except (OSError, ValueError):
        return  # a draft directory without its own tokenizer uses the target's
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError("draft_model: its tokenizer's vocabulary differs from the target's")


def end_of_sequence_ids(model_path: str, tokenizer) -> tuple[int, ...]:
    """Every id that ends a request: the tokenizer's EOS and those of the generation config
    (instruct models often list several, e.g. Llama 3's end-of-turn tokens)."""
    ids = [tokenizer.eos_token_id]
    try:
        configured = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        configured = None
    ids += configured if isinstance(configured, list) else [configured]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def longest_token_chars(tokenizer) -> int:
    return max(len(tokenizer.convert_tokens_to_string([token])) for token in tokenizer.get_vocab())


def check_tensor_parallel(model_config, config: EngineConfig) -> None:
    """What transformers' plan needs to shard the target over `tensor_parallel_size` ranks."""
    size = config.tensor_parallel_size
    if not getattr(model_config, "base_model_tp_plan", None):
        raise ConfigError(f"tensor_parallel_size: {type(model_config).__name__} has no tensor-parallel plan "
                          "(base_model_tp_plan) in transformers")
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    if size > kv_heads:
        raise ConfigError(f"tensor_parallel_size {size} exceeds the target's num_key_value_heads {kv_heads}: "
                          "every rank needs a key/value head of its own")
    for key in ("num_key_value_heads", "num_attention_heads", "intermediate_size", "vocab_size"):
        value = getattr(model_config, key, None)
        if value is not None and value % size:
            raise ConfigError(f"tensor_parallel_size {size} does not divide the target's {key} {value}")
    accelerator = torch._C._get_accelerator().type
    if config.target_device == "cpu" and accelerator != "cpu":
        # transformers shards over the machine's accelerator, whatever target_device says.
        raise ConfigError(f"tensor_parallel_size > 1 with target_device cpu needs a machine without an "
                          f"accelerator; this one has {accelerator}")
    if config.target_device != "cpu":
        last = rank_device(config.target_device, size - 1)
        if int(last.partition(":")[2]) >= torch.cuda.device_count():
            raise ConfigError(f"tensor_parallel_size {size} from target_device {config.target_device} needs "
                              f"{last}; this machine has {torch.cuda.device_count()} GPU(s)")


def check_context(model_config, config: EngineConfig) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and config.max_model_len > limit:
        raise ConfigError(f"max_model_len {config.max_model_len} exceeds the model's "
                          f"max_position_embeddings {limit}")
