"""Where a train stage's seconds went: a stopwatch with named parts (stdlib only, no torch).

The train stage marks each part as it ends (start-up, imports, data, fit, model save, tracking
wait, ...); fit adds each epoch's train / val / checkpoint / log seconds. The parts go to
`metrics/train.json` and `reports/train_details.json` (`timing`; the details file adds each
epoch's), and to the MLflow run as `time/<part>_s` metrics.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def process_age_s() -> float | None:
    """Seconds since this process started (interpreter + imports before the stage), if known."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return None


class StageClock:
    """Named consecutive parts of a stage, each the time since the previous mark."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        startup = process_age_s()
        if startup is not None:
            self.parts["startup"] = round(startup, 3)
        self._last = time.perf_counter()

    def mark(self, part: str) -> float:
        """End `part` now (a repeated name adds up); its seconds."""
        now = time.perf_counter()
        seconds = now - self._last
        self._last = now
        self.parts[part] = round(self.parts.get(part, 0.0) + seconds, 3)
        return seconds

    def split(self, part: str, into: dict[str, float]) -> None:
        """Break an already marked part into sub-parts (what is left stays `part`)."""
        rest = self.parts.get(part, 0.0) - sum(into.values())
        for name, seconds in into.items():
            self.parts[name] = round(self.parts.get(name, 0.0) + seconds, 3)
        self.parts[part] = round(max(rest, 0.0), 3)

    def report(self, epochs: list[dict[str, float]] | None = None) -> dict[str, Any]:
        """`{total_s, <part>_s...}` (the metrics file); with `epochs` too (the details file)."""
        out: dict[str, Any] = {"total_s": round(sum(self.parts.values()), 3)}
        out.update({f"{k}_s": v for k, v in self.parts.items()})
        if epochs is not None:
            out["epochs"] = epochs
        return out

    def metrics(self) -> dict[str, float]:
        """MLflow metrics `time/<part>_s` (and `time/total_s`) of what is marked so far."""
        flat = {f"time/{k}_s": v for k, v in self.parts.items()}
        flat["time/total_s"] = round(sum(self.parts.values()), 3)
        return flat
