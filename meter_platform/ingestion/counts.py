"""What a micro-batch (or a whole run) did: the counts the ledger balances, and where the time went."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BatchCounts:
    """What one micro-batch (or a whole run) did."""

    messages: int = 0
    events: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    redelivered: int = 0  # messages skipped because an earlier batch had committed them
    first_seq: int | None = None
    last_seq: int | None = None
    batches: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (ingestion/timing.py)

    def add(self, other: BatchCounts) -> None:
        """Fold another batch's counts into these."""
        for name in ("messages", "events", "stored", "duplicates", "quarantined", "redelivered", "batches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for stage, seconds in other.stages.items():
            self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        if other.first_seq is not None:
            self.first_seq = (
                other.first_seq if self.first_seq is None else min(self.first_seq, other.first_seq)
            )
        if other.last_seq is not None:
            self.last_seq = other.last_seq if self.last_seq is None else max(self.last_seq, other.last_seq)

    @property
    def balanced(self) -> bool:
        """Every event is stored, a duplicate or quarantined."""
        return self.events == self.stored + self.duplicates + self.quarantined
