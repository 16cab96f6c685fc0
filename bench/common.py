"""Helpers the benchmark scripts share (standard library only: they run on the GPU box too)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (what `lscpu` shows; platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def overlay(base: dict, preset: dict) -> dict:
    """`base` with `preset`'s keys set (nested mappings key by key; lists and values replaced)."""
    out = dict(base)
    for key, value in preset.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = overlay(out[key], value)
        else:
            out[key] = value  # model.kwargs whole: the architecture's own keys, not a mix
    return out
