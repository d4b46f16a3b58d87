"""The benchmark's set-ups, shared by bench and bench_report, and the best-row helper."""
from minedraft.config import MODE_TRAITS

# Set-ups: (model name, engine parameters). Cores: 0 and 1 of the machine's first two.
SETUPS = {
    "ar": ("minedraft_ar", {"mode": "ar", "target_cpus": "0-1"}),
    "sd": ("minedraft_sd", {"mode": "sd", "target_cpus": "0-1", "drafter": "inline"}),
    "psd": ("minedraft_psd", {"mode": "psd", "target_cpus": "0", "draft_cpus": "1", "drafter": "process"}),
    # P1b, the paper's set-up: SD with its draft on the target's one core (PSD gets a second one).
    # It is also SD's one-thread tuning on the 2-core machine, and ar_1core AR's.
    "sd_1core": ("minedraft_sd_1core", {"mode": "sd", "target_cpus": "0", "drafter": "inline"}),
    "ar_1core": ("minedraft_ar_1core", {"mode": "ar", "target_cpus": "0"}),
    # Flex on PSD's cores: it picks AR, SD or PSD every step. The target runs on core 0 in every
    # step; SD steps draft in the drafter process on core 1 too, PSD steps beside the verification.
    "flex": ("minedraft_flex", {"mode": "flex", "target_cpus": "0", "draft_cpus": "1", "drafter": "process"}),
    # FlexDraft's batch-size switch on the same cores: the simple baseline beside flex.
    "auto": ("minedraft_auto", {"mode": "auto", "target_cpus": "0", "draft_cpus": "1", "drafter": "process"}),
    # The served default: auto on both cores with the in-process drafter, so AR or SD each step by
    # the running requests (no PSD: nothing runs beside the target).
    "auto_inline": ("minedraft_auto_inline", {"mode": "auto", "target_cpus": "0-1", "drafter": "inline"}),
    # Flex with FlexDraft's confidence cut, to choose draft_confidence_threshold's default.
    "flex_tau": ("minedraft_flex_tau", {"mode": "flex", "target_cpus": "0", "draft_cpus": "1", "drafter": "process",
                                        "draft_confidence_threshold": 0.1}),
}
FIXED_SETUPS = ("ar", "ar_1core", "sd", "sd_1core", "psd")
SD_SETUPS = ("sd", "sd_1core")


def mode_of(setup: str) -> str:
    return SETUPS[setup][1]["mode"]


CHOOSING_SETUPS = tuple(s for s in SETUPS if MODE_TRAITS[mode_of(s)].chooses_each_step)  # those that choose every step


def best_by_tokens_per_s(rows):
    """The row with the highest "tokens_per_s" among the rows that are not None (the first on a tie), or None."""
    return max((r for r in rows if r is not None), key=lambda r: r["tokens_per_s"], default=None)
