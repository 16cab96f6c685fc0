"""GX results as report records: observed value, example paths, one line saying the problem."""

from __future__ import annotations

from typing import Any

import numpy as np

from imgcls.data.validation.common import KEYS, MAX_EXAMPLES, MAX_LISTED
from imgcls.data.validation.frames import Frames
from imgcls.data.validation.rules import Check


def outcome(check: Check, res: dict[str, Any], frames: Frames, n: int) -> dict[str, Any]:
    """One JSON-able record per expectation: config, observed value, success, examples."""
    config = res["expectation_config"]
    kwargs = plain({k: v for k, v in config["kwargs"].items() if k != "batch_id"})
    result = res.get("result") or {}
    exc = res.get("exception_info") or {}
    key = KEYS[check.batch]
    index = result.get("unexpected_index_list") or result.get("partial_unexpected_index_list") or []
    keys = [row.get(key) for row in index if isinstance(row, dict)]
    out = {
        "batch": check.batch,
        "expectation_type": config["type"],
        "kwargs": kwargs,
        "severity": str(config.get("severity") or "critical"),
        "success": bool(res["success"]),
        "title": check.title,
        "hint": "" if res["success"] else check.hint,
        "observed_value": plain(result.get("observed_value")),
        "element_count": result.get("element_count", n),
        "unexpected_count": result.get("unexpected_count"),
        "unexpected_percent": result.get("unexpected_percent"),
        "unexpected_values": plain(_unexpected_values(result, key)),
        "exception": exc.get("exception_message") if exc.get("raised_exception") else None,
    }
    out["examples"] = [] if res["success"] else _examples(check, kwargs, index, keys, frames)
    out["problem"] = "" if res["success"] else _problem(check, out, keys, frames)
    return out


def plain(value: Any) -> Any:
    """Numpy scalars (GX passes some through) as plain Python values, recursively."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _unexpected_values(result: dict[str, Any], key: str) -> list[Any]:
    """The offending keys of a derived frame (classes, digests, clusters); empty for rows."""
    if key == "path":
        return []
    index = result.get("unexpected_index_list") or []
    return [row.get(key) for row in index if isinstance(row, dict)][:MAX_LISTED]


def _examples(
    check: Check, kwargs: dict[str, Any], index: list[Any], keys: list[Any], frames: Frames
) -> list[str]:
    """Up to ten example paths (with the offending value) for a failed expectation."""
    column = kwargs.get("column")
    if KEYS[check.batch] == "path":
        out = []
        for row in index[:MAX_EXAMPLES]:
            value = row.get(column) if isinstance(row, dict) else None
            shown = "missing" if value is None else repr(value)
            if value is None and column in ("width", "height"):
                shown = "missing or not a number"  # coerced to a number before GX sees it
            out.append(f"{row.get('path')} ({column}={shown})")
        return out
    rows = frames.rows.get(check.batch)
    if rows is None or not keys:
        return []
    hit = rows[rows["key"].isin(keys)].sort_values(["key", "path"])
    if check.batch == "classes":
        # one example per failing class in turn, so every class listed shows up
        hit = hit.assign(_turn=hit.groupby("key").cumcount()).sort_values(["_turn", "key"])
    return [
        f"{r.path} (label={r.label!r}{_key_note(check.batch, r.key)})"
        for r in hit.head(MAX_EXAMPLES).itertuples()
    ]


def _key_note(batch: str, key: str) -> str:
    """Extra words naming the derived key an example path belongs to."""
    if batch == "sha256":
        return f", sha256={key[:12]}…"
    if batch == "near_duplicates":
        return f", cluster={key}"
    if batch == "merged_groups":
        return f", group={key}"
    return ""


def _problem(check: Check, out: dict[str, Any], keys: list[Any], frames: Frames) -> str:
    """One line saying what was observed, and how many rows it concerns."""
    if out["exception"]:
        return f"could not be evaluated: {out['exception']}"
    if out["expectation_type"] == "expect_column_to_exist":
        present = ", ".join(map(str, frames.tables[check.batch].columns)) or "none"
        return f"no column `{out['kwargs']['column']}` (columns present: {present})"
    kind = KEYS[check.batch]
    if out["unexpected_count"] is not None and kind == "path":
        text = (
            f"{out['unexpected_count']} of {out['element_count']} rows "
            f"({out['unexpected_percent'] or 0:.2f}%)"
        )
        mostly = out["kwargs"].get("mostly")
        if mostly is not None and mostly < 1:
            text += f", at most {(1 - mostly) * 100:.2f}% allowed"
        return text
    if out["unexpected_count"] is not None:
        rows = frames.rows[check.batch]
        n_rows = int(rows["key"].isin(keys).sum())
        if check.batch == "classes":
            shown = ", ".join(f"{k} ({frames.class_counts.get(str(k), 0)})" for k in keys)
        else:
            shown = ", ".join(map(str, keys[:MAX_EXAMPLES]))
        noun = {
            "classes": "classes",
            "sha256": "duplicate sets",
            "near_duplicates": "clusters",
            "merged_groups": "merged groups",
        }
        return (
            f"{out['unexpected_count']} of {out['element_count']} {noun[check.batch]} "
            f"({n_rows} rows): {shown}"
        )
    if out["observed_value"] is not None:
        text = f"observed {out['observed_value']!r}, expected {_bounds(out['kwargs'])}"
        return text + _extremes(frames.class_counts) if check.batch == "classes" else text
    if check.batch == "classes":
        return "no decodable images to count"
    return "not met"


def _extremes(counts: dict[str, int]) -> str:
    """Words naming the largest and smallest non-empty class."""
    present = {k: v for k, v in counts.items() if v > 0}
    if not present:
        return ""
    big = max(present, key=lambda k: (present[k], k))
    small = min(present, key=lambda k: (present[k], k))
    return f" (largest {big!r}: {present[big]}, smallest {small!r}: {present[small]})"


def _bounds(kwargs: dict[str, Any]) -> str:
    """Render min/max bounds of an expectation as words."""
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and hi is not None:
        return f"between {lo:g} and {hi:g}"
    if lo is not None:
        return f"at least {lo:g}"
    if hi is not None:
        return f"at most {hi:g}"
    return "a value"
