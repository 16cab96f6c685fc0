"""The machine-readable validation report (reports/validation.json)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from imgcls.data.validation.common import LARGEST_SHOWN, MAX_LISTED, as_text
from imgcls.data.validation.frames import Frames
from imgcls.data.validation.gx_runner import gx_version

if TYPE_CHECKING:
    from imgcls.config import ValidateConfig


def build_report(
    manifest: pd.DataFrame, cfg: ValidateConfig, frames: Frames, outcomes: list[dict[str, Any]]
) -> dict[str, Any]:
    """The machine-readable report: counts, every expectation, quarantine and duplicate lists."""
    table = frames.tables["manifest"]
    quarantine = _quarantine(table) if {"path", "label", "error"} <= set(table.columns) else []
    failed = [o for o in outcomes if not o["success"] and o["severity"] == "critical"]
    warned = [o for o in outcomes if not o["success"] and o["severity"] != "critical"]
    n = len(manifest)
    valid_groups = frames.valid["group"].nunique() if len(frames.valid) else 0
    images = frames.tables.get("images")
    dup_rows = sum(len(d["paths"]) for d in frames.duplicates)
    near = frames.near
    merged_table = frames.tables.get("merged_groups", pd.DataFrame())
    summary = {
        "rows": n,
        "valid": len(frames.valid),
        "quarantined": len(quarantine),
        "quarantine_fraction": round(len(quarantine) / n, 6) if n else 0.0,
        "max_quarantine_fraction": cfg.max_quarantine_fraction,
        "classes": len(frames.found_labels),
        "exact_duplicate_sets": len(frames.duplicates),
        "exact_duplicate_rows": dup_rows,
        "conflicting_duplicate_sets": sum(d["conflicting_labels"] for d in frames.duplicates),
        "near_duplicate_clusters": len(frames.clusters),
        "near_duplicate_rows": sum(len(c["paths"]) for c in frames.clusters),
        "near_duplicate_candidates": near.candidates if near else 0,
        "near_duplicate_verified_pairs": len(near.pairs) if near else 0,
        "near_duplicate_unverifiable_pairs": near.unverifiable if near else 0,
        "near_duplicate_pairs_across_clusters": near.cut if near else 0,
        "merged_groups": len(merged_table),
        "merged_group_rows": int(merged_table["rows"].sum()) if len(merged_table) else 0,
        "largest_merged_group": int(merged_table["rows"].max()) if len(merged_table) else 0,
        "groups_before": int(images["group"].nunique()) if images is not None else 0,
        "groups_after": int(valid_groups),
        "expectations": len(outcomes),
        "failed_expectations": len(failed),
        "warnings": len(warned),
    }
    labels: dict[str, Any] = {
        "configured": list(cfg.classes) if cfg.classes else None,
        "found": frames.found_labels,
        "counts": frames.class_counts,  # images per class; per individual label if multi-label
    }
    if frames.multi_label:
        summary["label_combinations"] = len(frames.combinations)
        labels["multi_label"] = True
        labels["combinations"] = dict(list(frames.combinations.items())[:MAX_LISTED])
        labels["combinations_truncated"] = max(0, len(frames.combinations) - MAX_LISTED)
    return {
        "success": not failed,
        "summary": summary,
        "params": cfg.model_dump(mode="json"),
        "labels": labels,
        "expectations": outcomes,
        "quarantine": quarantine[:MAX_LISTED],
        "duplicates": frames.duplicates[:MAX_LISTED],
        "near_duplicates": frames.clusters[:MAX_LISTED],
        "largest_merged_groups": frames.merged[:LARGEST_SHOWN],
        "truncated": {
            "quarantine": max(0, len(quarantine) - MAX_LISTED),
            "duplicates": max(0, len(frames.duplicates) - MAX_LISTED),
            "near_duplicates": max(0, len(frames.clusters) - MAX_LISTED),
        },
        "great_expectations_version": gx_version(),
    }


def _quarantine(table: pd.DataFrame) -> list[dict[str, str]]:
    """Rows with an `error`, sorted by path: what is left out of the valid rows, and why."""
    bad = table[table["error"].notna()].sort_values("path")
    return [
        {"path": as_text(path), "label": as_text(label), "reason": str(reason)}
        for path, label, reason in zip(bad["path"], bad["label"], bad["error"], strict=True)
    ]
