"""One layer's attention step over a paged KV pool on CPU: today's gather + SDPA (A) against
FlexAttention reading the pool directly (B*), torch's PagedAttention helper (C) and gather + flex (D).

Qwen2.5-1.5B attention shape: 12 query heads, 2 kv heads, head_dim 128, bf16, pool block size 16.

Issue 40's item 3, measured: docs/benchmarks.md, "A paged KV pool", raw JSON in
docs/bench/paged/attention/. Usage (nothing else running while it times):
  python scripts/bench_paged_attention.py --compile-only   # populate inductor's caches, verify numerics (no timing)
  python scripts/bench_paged_attention.py --b 1 --out part_b1.json
  python scripts/bench_paged_attention.py --b 8 --out part_b8.json
  python scripts/bench_paged_attention.py --behaviour --out behaviour.json   # dynamic-shape compile / recompile checks
  python scripts/bench_paged_attention.py --merge part_b1.json part_b8.json behaviour.json --out result.json
"""
import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

torch.set_num_threads(2)
torch._dynamo.config.recompile_limit = 512
torch._dynamo.config.accumulated_recompile_limit = 4096
torch.fx.experimental._config.use_duck_shape = False  # as compile_decoder does

H, KVH, D, BS = 12, 2, 128, 16
G = H // KVH
DT = torch.bfloat16
NB = 8192  # usable pool blocks; block 0 is the null block on top
NSLOTS = (NB + 1) * BS
SHAPES = [(b, n, t) for b in (1, 8) for n in (1, 5) for t in (512, 2222, 8192)]
PART = 2  # partially visible blocks per row: ceil(n / 16) + 1 covers n <= 16 (positions t-n..t-1)
TOL = 2e-2

# ----------------------------------------------------------------------------------------------
# A: today's decoder_layer attention (model/compact.py): gather by slot table, fold GQA, SDPA + bool mask.


def attn_A(q, layer_keys, layer_values, slot_table, visible):
    b, _, n, _ = q.shape
    seen_keys, seen_values = layer_keys[slot_table].transpose(1, 2), layer_values[slot_table].transpose(1, 2)
    group = H // KVH
    q = q.reshape(b, KVH, group * n, D)
    visible = visible.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(q, seen_keys, seen_values, attn_mask=visible)
    return out.reshape(b, H, n, D)


def attn_A_dyn(q, layer_keys, layer_values, slot_table, visible):
    """A under dynamic=True (how compile_decoder compiles decoder_layer); own code object."""
    return attn_A(q, layer_keys, layer_values, slot_table, visible)


def flex_pool_fold_dyn(*args):
    """B1 under dynamic=True; own code object."""
    return flex_pool_fold(*args)


_DYN = {}


def dyn(name, fn):
    if name not in _DYN:
        _DYN[name] = torch.compile(fn, fullgraph=True, dynamic=True)
    return _DYN[name]


def gather_only(layer_keys, layer_values, slot_table):
    return layer_keys[slot_table].transpose(1, 2), layer_values[slot_table].transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# B: flex over the pool as one sequence of NSLOTS positions; BlockMask built (inside the compiled
# graph, from plain tensors) with the rows' fully visible blocks as "full" blocks (no mask_mod)
# and the last PART blocks as partial blocks (mask_mod checks owner row and logical position).


def pool_view(layer):  # [NSLOTS, KVH, D] -> [1, KVH, NSLOTS, D] (a view, no copy)
    return layer.permute(1, 0, 2).unsqueeze(0)


def make_flex_pool_fold_kvb(kvb):
    """B1 with a kv tile of `kvb` slots: needs the pool to hand out kvb-slot chunks (kvb / 16
    consecutive pool blocks) so that each tile belongs to one row."""
    def flex_pool_fold_kvb(q, layer_keys, layer_values, kv_num, kv_idx, full_num, full_idx, slot_row, slot_pos,
                           q_row, q_pos):
        b, _, n, _ = q.shape

        def mask_mod(bb, h, qi, kv):
            return (slot_row[kv] == q_row[qi]) & (slot_pos[kv] <= q_pos[qi])

        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(G * n, kvb), mask_mod=mask_mod,
                                      seq_lengths=(b * G * n, layer_keys.shape[0]), compute_q_blocks=False)
        qq = q.reshape(b, KVH, G * n, D).transpose(0, 1).reshape(1, KVH, b * G * n, D)
        out = flex_attention(qq, pool_view(layer_keys), pool_view(layer_values), block_mask=bm)
        return out.reshape(KVH, b, G * n, D).transpose(0, 1).reshape(b, H, n, D)
    return flex_pool_fold_kvb


# B1: GQA folded like A: queries [1, KVH, b*G*n, D], one q block (G*n queries) per row, kv tiles of
# one pool block.
flex_pool_fold = make_flex_pool_fold_kvb(BS)


def flex_pool_fold_nofull(q, layer_keys, layer_values, kv_num, kv_idx, slot_row, slot_pos, q_row, q_pos):
    """B1 without full blocks: every visited block is partial (mask_mod everywhere)."""
    b, _, n, _ = q.shape

    def mask_mod(bb, h, qi, kv):
        return (slot_row[kv] == q_row[qi]) & (slot_pos[kv] <= q_pos[qi])

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(G * n, BS), mask_mod=mask_mod,
                                  seq_lengths=(b * G * n, layer_keys.shape[0]), compute_q_blocks=False)
    qq = q.reshape(b, KVH, G * n, D).transpose(0, 1).reshape(1, KVH, b * G * n, D)
    out = flex_attention(qq, pool_view(layer_keys), pool_view(layer_values), block_mask=bm)
    return out.reshape(KVH, b, G * n, D).transpose(0, 1).reshape(b, H, n, D)


def flex_pool_gqa(q, layer_keys, layer_values, kv_num, kv_idx, full_num, full_idx, slot_row, slot_pos, q_row, q_pos):
    """B2: flex's own GQA (enable_gqa): queries [1, H, b*n, D], one q block (n queries) per row."""
    b, _, n, _ = q.shape

    def mask_mod(bb, h, qi, kv):
        return (slot_row[kv] == q_row[qi]) & (slot_pos[kv] <= q_pos[qi])

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(n, BS), mask_mod=mask_mod,
                                  seq_lengths=(b * n, layer_keys.shape[0]), compute_q_blocks=False)
    qq = q.transpose(0, 1).reshape(1, H, b * n, D)
    out = flex_attention(qq, pool_view(layer_keys), pool_view(layer_values), block_mask=bm, enable_gqa=True)
    return out.reshape(H, b, n, D).transpose(0, 1)


def flex_pool_batch(q, layer_keys, layer_values, kv_num, kv_idx, full_num, full_idx, slot_row, slot_pos, q_pos):
    """B3: rows as flex's batch, the pool broadcast over it (key batch 1): queries [b, KVH, G*n, D]."""
    b, _, n, _ = q.shape

    def mask_mod(bb, h, qi, kv):
        return (slot_row[kv] == bb) & (slot_pos[kv] <= q_pos[bb, qi])

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(G * n, BS), mask_mod=mask_mod,
                                  seq_lengths=(G * n, layer_keys.shape[0]), compute_q_blocks=False)
    qq = q.reshape(b, KVH, G * n, D)
    out = flex_attention(qq, pool_view(layer_keys), pool_view(layer_values), block_mask=bm)
    return out.reshape(b, H, n, D)


def build_pool_mask(block_table, positions, num_visible, block=BS):
    """Per-step BlockMask tensors from the block table [b, nblk] (int64, chunks of `block` slots)
    and the queries' positions [b, n]: full blocks = blocks every query of the row sees whole;
    partial = the next PART."""
    b, nblk = block_table.shape
    n_blocks_pool = -(-NSLOTS // block)
    first = positions[:, 0]
    nfull = torch.clamp((first + 1) // block, max=nblk)
    nvis = (num_visible + block - 1) // block  # blocks holding visible positions
    full_idx = torch.zeros(b, n_blocks_pool, dtype=torch.int32)
    full_idx[:, :nblk] = block_table
    cols = torch.clamp(nfull[:, None] + torch.arange(PART), max=nblk - 1)
    kv_idx = torch.zeros(b, n_blocks_pool, dtype=torch.int32)
    kv_idx[:, :PART] = torch.gather(block_table, 1, cols)
    return (nvis - nfull).to(torch.int32), kv_idx, nfull.to(torch.int32), full_idx


def build_lookups(block_table, num_visible, block=BS):
    """slot -> owner row, slot -> logical position over the whole pool (from scratch; a real pool
    would update these incrementally when it hands out or frees a block)."""
    b, nblk = block_table.shape
    slot_row = torch.full((NSLOTS,), -1, dtype=torch.int32)
    slot_pos = torch.full((NSLOTS,), -1, dtype=torch.int32)
    slots = (block_table[:, :, None] * block + torch.arange(block)).reshape(b, nblk * block)
    pos = torch.arange(nblk * block).expand(b, -1)
    live = pos < num_visible[:, None]
    slot_row[slots[live]] = torch.arange(b, dtype=torch.int32)[:, None].expand(b, nblk * block)[live]
    slot_pos[slots[live]] = pos[live].to(torch.int32)
    return slot_row, slot_pos


def mask_B1(block_table, positions, num_visible, block=BS):
    b, n = positions.shape
    kv_num, kv_idx, full_num, full_idx = build_pool_mask(block_table, positions, num_visible, block)
    slot_row, slot_pos = build_lookups(block_table, num_visible, block)
    q_row = torch.arange(b, dtype=torch.int32).repeat_interleave(G * n)
    q_pos = positions[:, None, :].expand(b, G, n).reshape(-1).to(torch.int32)
    return (kv_num.view(1, 1, b), kv_idx.view(1, 1, b, -1), full_num.view(1, 1, b), full_idx.view(1, 1, b, -1),
            slot_row, slot_pos, q_row, q_pos)


def mask_B1_nofull(block_table, positions, num_visible):
    b, n = positions.shape
    nblk = block_table.shape[1]
    kv_idx = torch.zeros(b, NB + 1, dtype=torch.int32)
    kv_idx[:, :nblk] = block_table
    kv_num = ((num_visible + BS - 1) // BS).to(torch.int32)
    slot_row, slot_pos = build_lookups(block_table, num_visible)
    q_row = torch.arange(b, dtype=torch.int32).repeat_interleave(G * n)
    q_pos = positions[:, None, :].expand(b, G, n).reshape(-1).to(torch.int32)
    return kv_num.view(1, 1, b), kv_idx.view(1, 1, b, -1), slot_row, slot_pos, q_row, q_pos


def mask_B2(block_table, positions, num_visible):
    b, n = positions.shape
    kv_num, kv_idx, full_num, full_idx = build_pool_mask(block_table, positions, num_visible)
    slot_row, slot_pos = build_lookups(block_table, num_visible)
    q_row = torch.arange(b, dtype=torch.int32).repeat_interleave(n)
    q_pos = positions.reshape(-1).to(torch.int32)
    return (kv_num.view(1, 1, b), kv_idx.view(1, 1, b, -1), full_num.view(1, 1, b), full_idx.view(1, 1, b, -1),
            slot_row, slot_pos, q_row, q_pos)


def mask_B3(block_table, positions, num_visible):
    b, n = positions.shape
    kv_num, kv_idx, full_num, full_idx = build_pool_mask(block_table, positions, num_visible)
    slot_row, slot_pos = build_lookups(block_table, num_visible)
    q_pos = positions[:, None, :].expand(b, G, n).reshape(b, G * n).to(torch.int32)
    return (kv_num.view(b, 1, 1), kv_idx.view(b, 1, 1, -1), full_num.view(b, 1, 1), full_idx.view(b, 1, 1, -1),
            slot_row, slot_pos, q_pos)


# ----------------------------------------------------------------------------------------------
# C: torch.nn.attention.experimental._paged_attention.PagedAttention: a logical causal block mask
# (create_block_mask over [b, n, t]) converted to physical pages; q [b, H, n, D] with enable_gqa,
# pool [1, KVH, NSLOTS, D] broadcast over the batch.


def flex_paged(q, kc, vc, block_mask):
    return flex_attention(q, kc, vc, block_mask=block_mask, enable_gqa=True)


def make_paged(block_table, num_visible):
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    b, nblk = block_table.shape
    pa = PagedAttention(n_pages=NB + 1, page_size=BS, max_batch_size=b, device="cpu")
    # Point its page table at our (scattered) pool blocks instead of its own allocation.
    pa.page_table[:, :nblk] = block_table
    rows = torch.arange(b)[:, None].expand(b, nblk)
    pa.physical_to_logical[rows, block_table] = torch.arange(nblk).expand(b, nblk)
    pa.capacity[:] = nblk * BS
    return pa


def mask_C(pa, positions, num_visible, tensor_positions=False):
    """The logical mask_mod reads the rows' first query position from a tensor (tensor_positions,
    fails to lower on CPU in torch 2.13, see errors) or as a Python int (all rows equal here; the
    int is baked into the graph, so a new t recompiles)."""
    b, n = positions.shape
    t = int(num_visible.max())
    first = positions[:, 0]
    first_int = int(first[0])

    if tensor_positions:
        def causal(bb, h, qi, kv):
            return kv <= first[bb] + qi
    else:
        def causal(bb, h, qi, kv):
            return kv <= first_int + qi

    logical = create_block_mask(causal, b, None, n, t, device="cpu", BLOCK_SIZE=(128, BS))
    return pa.convert_logical_block_mask(logical, kv_len=num_visible)


# ----------------------------------------------------------------------------------------------
# D: gather (as A) then flex over [b, KVH, t, D], GQA folded, causal by position.


def gather_flex(q, layer_keys, layer_values, slot_table, kv_num, kv_idx, full_num, full_idx, q_pos):
    b, _, n, _ = q.shape
    t = slot_table.shape[1]
    seen_keys, seen_values = layer_keys[slot_table].transpose(1, 2), layer_values[slot_table].transpose(1, 2)

    def mask_mod(bb, h, qi, kv):
        return kv <= q_pos[bb, qi]

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(G * n, BS), mask_mod=mask_mod,
                                  seq_lengths=(G * n, t), compute_q_blocks=False)
    out = flex_attention(q.reshape(b, KVH, G * n, D), seen_keys, seen_values, block_mask=bm)
    return out.reshape(b, H, n, D)


def mask_D(positions, num_visible, t):
    b, n = positions.shape
    nblk = (t + BS - 1) // BS
    first = positions[:, 0]
    nfull = torch.clamp((first + 1) // BS, max=nblk)
    nvis = (num_visible + BS - 1) // BS
    logical = torch.arange(nblk, dtype=torch.int32).expand(b, nblk)
    full_idx = logical.contiguous()
    kv_idx = torch.gather(logical, 1, torch.clamp(nfull[:, None] + torch.arange(nblk), max=nblk - 1)).contiguous()
    q_pos = positions[:, None, :].expand(b, G, n).reshape(b, G * n).to(torch.int32)
    return ((nvis - nfull).to(torch.int32).view(b, 1, 1), kv_idx.view(b, 1, 1, nblk),
            nfull.to(torch.int32).view(b, 1, 1), full_idx.view(b, 1, 1, nblk), q_pos)


# ----------------------------------------------------------------------------------------------


def make_pool(seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(NSLOTS, KVH, D, generator=g).to(DT)
    values = torch.randn(NSLOTS, KVH, D, generator=g).to(DT)
    return keys, values


def make_step(b, n, t, block=BS, seed=1):
    """b rows, each with t visible positions (0..t-1, the n new ones last), in scattered chunks of
    `block` slots (chunk 0 unused): the pool's blocks, or the coarser tiles B1kv* need."""
    g = torch.Generator().manual_seed(seed + 1000 * b + 10 * n + t + (0 if block == BS else block))
    nblk = (t + block - 1) // block
    block_table = (torch.randperm(NSLOTS // block - 1, generator=g)[:b * nblk] + 1).view(b, nblk)
    pos = torch.arange(t)
    slot_table = block_table[:, pos // block] * block + pos % block  # [b, t]
    positions = (t - n + torch.arange(n)).expand(b, n).contiguous()
    num_visible = torch.full((b,), t, dtype=torch.int64)
    visible = torch.arange(t) <= positions[:, None, :, None]  # [b, 1, n, t], once per step (all layers)
    q = torch.randn(b, H, n, D, generator=g).to(DT)
    return {"block_table": block_table, "slot_table": slot_table, "positions": positions, "num_visible": num_visible,
                "visible": visible, "q": q}


COLD = False  # --cold: evict the caches (write a 96 MiB buffer, > 32 MiB L3) before every timed call
_FLUSH = None


def flush_caches():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.zeros(24 * 1024 * 1024, dtype=torch.float32)
    _FLUSH.add_(1.0)


def bench(fn, args, warmup=5, min_reps=15, max_reps=300, budget_s=1.2, cold=None):
    cold = COLD if cold is None else cold
    for _ in range(warmup):
        fn(*args)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s * (3 if cold else 1)):
        if cold:
            flush_caches()
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e3
    return {"median_ms": statistics.median(times) * 1e3, "p10_ms": q(0.1), "p90_ms": q(0.9), "reps": len(times)}


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def run_shape(b, n, t, keys, values, do_time, impls):
    s = make_step(b, n, t)
    q, st, vis, bt, pos, nv = s["q"], s["slot_table"], s["visible"], s["block_table"], s["positions"], s["num_visible"]
    res = {"b": b, "n": n, "t": t, "impl": {}, "mask": {}, "errors": {}}
    cA = torch.compile(attn_A, fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    ref = cA(q, keys, values, st, vis)
    res["compile_s_A"] = time.perf_counter() - t0
    # float32 math reference on the gathered keys, to see A's own error
    kf, vf = keys[st].float().transpose(1, 2), values[st].float().transpose(1, 2)
    exact = F.scaled_dot_product_attention(q.float().reshape(b, KVH, G * n, D), kf, vf,
                                           attn_mask=vis.repeat(1, 1, G, 1)).reshape(b, H, n, D)
    res["A_vs_fp32"] = maxdiff(ref, exact)

    plan = {}
    plan["A_gather_sdpa"] = (cA, (q, keys, values, st, vis), None)
    if "Adyn" in impls:
        plan["A_dyn_gather_sdpa"] = (dyn("A", attn_A_dyn), (q, keys, values, st, vis), None)
    if "B1dyn" in impls:
        plan["B1_dyn_flex_pool_fold"] = (dyn("B1", flex_pool_fold_dyn), (q, keys, values) + mask_B1(bt, pos, nv), None)
    plan["gather_only"] = (torch.compile(gather_only, fullgraph=True, dynamic=False), (keys, values, st), None)
    if "B1" in impls:
        plan["B1_flex_pool_fold"] = (torch.compile(flex_pool_fold, fullgraph=True, dynamic=False),
                                     (q, keys, values) + mask_B1(bt, pos, nv), lambda: mask_B1(bt, pos, nv))
    if "B1nf" in impls:
        plan["B1nf_flex_pool_fold_nofull"] = (torch.compile(flex_pool_fold_nofull, fullgraph=True, dynamic=False),
                                              (q, keys, values) + mask_B1_nofull(bt, pos, nv),
                                              lambda: mask_B1_nofull(bt, pos, nv))
    if "B2" in impls:
        plan["B2_flex_pool_gqa"] = (torch.compile(flex_pool_gqa, fullgraph=True, dynamic=False),
                                    (q, keys, values) + mask_B2(bt, pos, nv), lambda: mask_B2(bt, pos, nv))
    if "B3" in impls:
        plan["B3_flex_pool_batch"] = (torch.compile(flex_pool_batch, fullgraph=True, dynamic=False),
                                      (q, keys, values) + mask_B3(bt, pos, nv), lambda: mask_B3(bt, pos, nv))
    if "C" in impls:
        try:
            pa = make_paged(bt, nv)
            bmC = mask_C(pa, pos, nv)
            plan["C_paged_attention"] = (torch.compile(flex_paged, fullgraph=True, dynamic=False),
                                         (q, pool_view(keys), pool_view(values), bmC), lambda: mask_C(pa, pos, nv))
            if "Ct" in impls:
                plan["C_paged_attention_tensorpos"] = (
                    torch.compile(flex_paged, fullgraph=True, dynamic=False),
                    (q, pool_view(keys), pool_view(values), mask_C(pa, pos, nv, True)),
                    lambda: mask_C(pa, pos, nv, True))
        except Exception as e:  # noqa: BLE001
            res["errors"]["C_paged_attention"] = f"{type(e).__name__}: {str(e)[:400]}"
    if "D" in impls:
        plan["D_gather_flex"] = (torch.compile(gather_flex, fullgraph=True, dynamic=False),
                                 (q, keys, values, st) + mask_D(pos, nv, t), lambda: mask_D(pos, nv, t))
    for kvb in (64, 128):
        if f"B1kv{kvb}" not in impls:
            continue
        s2 = make_step(b, n, t, kvb)
        args2 = (s2["q"], keys, values) + mask_B1(s2["block_table"], s2["positions"], s2["num_visible"], kvb)
        fnk = torch.compile(make_flex_pool_fold_kvb(kvb), fullgraph=True, dynamic=False)
        try:
            t0 = time.perf_counter()
            o2 = fnk(*args2)
            entry = {"first_call_s": time.perf_counter() - t0}
            refk = cA(s2["q"], keys, values, s2["slot_table"], s2["visible"])
            entry["maxdiff_vs_A"] = maxdiff(o2, refk)
            entry["ok"] = entry["maxdiff_vs_A"] < TOL
            if do_time:
                entry.update(bench(fnk, args2))
                entry["A_same_layout"] = bench(cA, (s2["q"], keys, values, s2["slot_table"], s2["visible"]))
            res["impl"][f"B1kv{kvb}_flex_pool_fold_kvtile{kvb}"] = entry
        except Exception as e:  # noqa: BLE001
            res["errors"][f"B1kv{kvb}"] = f"{type(e).__name__}: {str(e)[:600]}"
        print(f"B1kv{kvb}", res["impl"].get(f"B1kv{kvb}_flex_pool_fold_kvtile{kvb}"), flush=True)
    # lookups alone (part of B's mask cost when rebuilt from scratch every step)
    mask_only = {"lookups_full_pool_rebuild": lambda: build_lookups(bt, nv),
                 "pool_block_tensors_only": lambda: build_pool_mask(bt, pos, nv)}

    for name, (fn, args, mk) in plan.items():
        try:
            t0 = time.perf_counter()
            out = fn(*args)
            cs = time.perf_counter() - t0
            entry = {"first_call_s": cs}
            if name != "gather_only":
                entry["maxdiff_vs_A"] = maxdiff(out, ref)
                entry["ok"] = entry["maxdiff_vs_A"] < TOL
            if do_time:
                entry.update(bench(fn, args))
                if mk is not None and not COLD:
                    res["mask"][name] = bench(mk, (), min_reps=15, max_reps=200, budget_s=0.5)
            res["impl"][name] = entry
        except Exception as e:  # noqa: BLE001
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:600]}"
        print(name, res["impl"].get(name), res["errors"].get(name), flush=True)
    if do_time and not COLD:
        for name, mk in mask_only.items():
            res["mask"][name] = bench(mk, (), min_reps=15, max_reps=200, budget_s=0.5)
    return res


def graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def behaviour(keys, values):
    """dynamic=True (as the project compiles decoder_layer): does each impl compile, and does a new
    t / b / n recompile? Also: does rebuilding C's BlockMask (a new mask_mod closure) recompile?"""
    torch.fx.experimental._config.use_duck_shape = False
    out = {}
    seq = [(1, 5, 512), (1, 5, 2222), (8, 5, 2222), (8, 5, 8192), (2, 5, 700), (1, 1, 512), (8, 1, 8192)]
    for name in ("A", "B1", "B3", "D"):
        fn = {"A": attn_A, "B1": flex_pool_fold, "B3": flex_pool_batch, "D": gather_flex}[name]
        torch._dynamo.reset()
        c = torch.compile(fn, fullgraph=True, dynamic=True)
        log = []
        for b, n, t in seq:
            s = make_step(b, n, t)
            q, st, vis, bt, pos, nv = (s[k] for k in ("q", "slot_table", "visible", "block_table", "positions",
                                                       "num_visible"))
            args = {"A": lambda: (q, keys, values, st, vis),
                    "B1": lambda: (q, keys, values) + mask_B1(bt, pos, nv),
                    "B3": lambda: (q, keys, values) + mask_B3(bt, pos, nv),
                    "D": lambda: (q, keys, values, st) + mask_D(pos, nv, t)}[name]()
            g0 = graphs()
            t0 = time.perf_counter()
            try:
                o = c(*args)
                ref = attn_A(q, keys, values, st, vis)
                t1 = time.perf_counter() - t0
                t0 = time.perf_counter()
                c(*args)
                t2 = time.perf_counter() - t0
                log.append({"b": b, "n": n, "t": t, "new_graphs": graphs() - g0, "first_call_s": round(t1, 3),
                                "second_call_ms": round(t2 * 1e3, 3), "maxdiff_vs_eagerA": maxdiff(o, ref)})
            except Exception as e:  # noqa: BLE001
                log.append({"b": b, "n": n, "t": t, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            print(name, log[-1], flush=True)
        out[name] = log
    # C: fresh BlockMask per step passed into a compiled function
    torch._dynamo.reset()
    c = torch.compile(flex_paged, fullgraph=True, dynamic=False)
    log = []
    s = make_step(8, 1, 2222)
    pa = make_paged(s["block_table"], s["num_visible"])
    for step in range(3):
        bm = mask_C(pa, s["positions"], s["num_visible"])
        g0 = graphs()
        t0 = time.perf_counter()
        try:
            c(s["q"], pool_view(keys), pool_view(values), bm)
            log.append({"step": step, "new_graphs": graphs() - g0, "call_s": round(time.perf_counter() - t0, 3)})
        except Exception as e:  # noqa: BLE001
            log.append({"step": step, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        print("C fresh mask", log[-1], flush=True)
    out["C_fresh_blockmask_each_step_static"] = log
    return out


def membw():
    """Rough memory bandwidth with 2 threads: read (sum) and copy of a 64 MiB bf16 tensor."""
    x = torch.randn(32 * 1024 * 1024).to(DT)
    y = torch.empty_like(x)
    r = bench(lambda: x.sum(), (), budget_s=0.5)
    c = bench(lambda: y.copy_(x), (), budget_s=0.5)
    mib = x.numel() * 2 / 2**20
    return {"read_GiBps": mib / 1024 / (r["median_ms"] / 1e3), "copy_GiBps_read_plus_write": 2 * mib / 1024 / (c["median_ms"] / 1e3)}


def env_info():
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu, "python": platform.python_version(),
                "pool_blocks": NB, "pool_slots": NSLOTS, "block_size": BS, "heads": H, "kv_heads": KVH, "head_dim": D, "dtype": str(DT),
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--n", type=int, nargs="*", default=[1, 5])
    ap.add_argument("--t", type=int, nargs="*", default=[512, 2222, 8192])
    ap.add_argument("--impls", default="Adyn,B1,B1dyn,B1nf,B2,B3,C,D")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--membw", action="store_true")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--behaviour", action="store_true")
    ap.add_argument("--merge", nargs="*")
    ap.add_argument("--out", default="/tmp/flex/result.json")
    a = ap.parse_args()
    if a.merge:
        merged = {"env": env_info(), "shapes": [], "behaviour": None}
        for p in a.merge:
            d = json.load(open(p))
            for sh in d.get("shapes", []):
                sh["cold"] = d.get("cold", False)
            merged["shapes"] += d.get("shapes", [])
            merged["behaviour"] = d.get("behaviour") or merged["behaviour"]
            merged["membw"] = d.get("membw") or merged.get("membw")
        json.dump(merged, open(a.out, "w"), indent=1)
        return
    global COLD
    COLD = a.cold
    keys, values = make_pool()
    result = {"env": env_info(), "shapes": [], "cold": COLD}
    if a.membw:
        result["membw"] = membw()
        print(result["membw"])
    if a.behaviour:
        result["behaviour"] = behaviour(keys, values)
    else:
        impls = set(a.impls.split(","))
        for b in a.b:
            for n in a.n:
                for t in a.t:
                    result["shapes"].append(run_shape(b, n, t, keys, values, not a.compile_only, impls))
                    json.dump(result, open(a.out, "w"), indent=1)
    json.dump(result, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
