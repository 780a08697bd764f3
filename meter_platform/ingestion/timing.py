"""Where a micro-batch's time goes: a lap clock whose laps are summed per stage (fetch, decode,
validate, claim, insert, quarantine, aggregate, ledger, commit, ack), so the bench can show the next
bottleneck. Costs two ``perf_counter`` calls per stage."""

from __future__ import annotations

import time

#: The stages in pipeline order (what the bench prints).
STAGES = (
    "fetch",
    "decode",
    "validate",
    "claim",
    "insert",
    "quarantine",
    "aggregate",
    "ledger",
    "commit",
    "ack",
)


class StageClock:
    """Laps since the last lap (or since creation), summed per stage name in ``seconds``."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = seconds if seconds is not None else {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Add the time since the last lap to ``stage``."""
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + (now - self._last)
        self._last = now

    def restart(self) -> None:
        """Start the next lap now (time since the last lap is not counted anywhere)."""
        self._last = time.perf_counter()
