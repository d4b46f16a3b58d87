"""Who runs: the waiting queue and the internal batches. Bookkeeping only: rows are indices here;
the caches that rows address belong to the engine (the target's) and to drafting (the draft's),
which apply the row moves this module reports."""
from collections import deque
from dataclasses import dataclass

from minedraft.sequence import Sequence


@dataclass(frozen=True)
class RowMove:
    """A batch's last row took the place of a row that left: `seq`'s cache row moves src -> dst."""
    seq: Sequence
    src: int
    dst: int


class Batch:
    """One internal batch. Its live rows are always 0..len-1 of its caches: a leaving request's
    row is filled by the last row (`remove` reports the move)."""

    def __init__(self, slot: int, capacity: int):
        self.slot = slot
        self.capacity = capacity
        self.seqs: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence) -> None:
        self.seqs.append(seq)

    def remove(self, seq: Sequence) -> RowMove | None:
        row, last = self.seqs.index(seq), len(self.seqs) - 1
        moved = None
        if row != last:
            moved = RowMove(self.seqs[last], last, row)
            self.seqs[row] = moved.seq
        self.seqs.pop()
        return moved


class Scheduler:
    def __init__(self, batches: list[Batch]):
        self.batches = batches
        self.waiting: deque[Sequence] = deque()

    @property
    def num_running(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def capacity(self) -> int:
        return sum(b.capacity for b in self.batches)

    def admit(self, split: bool = True, fits=None) -> list[tuple[Sequence, Batch]]:
        """Move waiting requests into the smaller batch (`split`, PSD's layout) or into the first
        batch with room (one big batch for SD and AR), in order, while there is a row and `fits`
        says the queue's head fits (the engine's test: KV blocks). Running requests follow a
        changed layout through layout_moves."""
        admitted = []
        while self.waiting:
            open_batches = [b for b in self.batches if len(b) < b.capacity]
            if not open_batches or (fits is not None and not fits(self.waiting[0])):
                break
            batch = min(open_batches, key=len) if split else open_batches[0]
            seq = self.waiting.popleft()
            batch.add(seq)
            admitted.append((seq, batch))
        return admitted

    def layout_moves(self, split: bool) -> list[tuple[Sequence, Batch, Batch]]:
        """(request, from, to) moves that bring the running requests into the wanted layout:
        two balanced batches (split) or as many as fit in the first. Each move takes the source's
        last row, so no other row shifts."""
        if len(self.batches) != 2:
            return []
        first, second = self.batches
        sizes = [len(first), len(second)]
        moves = []
        while True:
            if split and abs(sizes[0] - sizes[1]) > 1:
                src = 0 if sizes[0] > sizes[1] else 1
            elif not split and sizes[1] and sizes[0] < first.capacity:
                src = 1
            else:
                return moves
            source, target = self.batches[src], self.batches[1 - src]
            moves.append((source.seqs[sizes[src] - 1], source, target))
            sizes[src] -= 1
            sizes[1 - src] += 1

    def find(self, request_id: str) -> tuple[Sequence, Batch | None] | None:
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq, None
        for batch in self.batches:
            for seq in batch.seqs:
                if seq.request_id == request_id:
                    return seq, batch
        return None
