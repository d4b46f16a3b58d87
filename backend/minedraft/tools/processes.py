"""A process tree and its memory, read from /proc (Linux): the server, its Python stub, its drafter."""
import os
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def rss_kb_by_process(root_pid: int) -> dict[str, int]:
    """VmRSS of `root_pid` and each process below it, keyed "pid command line"."""
    rss = {}
    for pid in [root_pid] + descendants(root_pid):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:70]
            status = Path(f"/proc/{pid}/status").read_text()
            rss[f"{pid} {name}"] = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            continue
    return rss
