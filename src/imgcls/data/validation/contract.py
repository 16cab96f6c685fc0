"""The data contract's entry point: manifest in, valid rows + report out (never raises for data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from imgcls.data.schema import MANIFEST_COLUMNS
from imgcls.data.validation.common import DataContractError
from imgcls.data.validation.frames import build_frames
from imgcls.data.validation.gx_runner import run_suite
from imgcls.data.validation.markdown import render_markdown
from imgcls.data.validation.outcomes import outcome
from imgcls.data.validation.report import build_report
from imgcls.data.validation.rules import build_checks

if TYPE_CHECKING:
    from imgcls.config import ValidateConfig


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_manifest`."""

    ok: bool  # False = hard failure: the stage must exit non-zero
    valid: pd.DataFrame  # rows that passed; `group` merged for duplicates and near-duplicates
    report: dict[str, Any]  # JSON-able: expectations, quarantine, duplicates, clusters, counts
    markdown: str  # human report (also a GitHub job summary)
    failures: list[dict[str, Any]] = field(default_factory=list)  # failed critical expectations
    # verified near-duplicate pairs: path, twin, similarity, hamming, same_cluster
    near_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> str:
        """Readable failure summary: which expectation, how many rows, up to ten example paths."""
        counts = self.report.get("summary", {})
        if self.ok:
            return (
                f"validation passed: {counts.get('valid', 0)} of {counts.get('rows', 0)} rows "
                f"valid, {counts.get('quarantined', 0)} quarantined, "
                f"{counts.get('warnings', 0)} warning(s)"
            )
        lines = [
            f"validation failed: {len(self.failures)} expectation(s) not met "
            f"({counts.get('rows', 0)} manifest rows)"
        ]
        for item in self.failures:
            lines.append(f"  x {item['title']}")
            lines.append(f"    {item['expectation_type']} on {item['batch']}: {item['problem']}")
            lines.extend(f"      {ex}" for ex in item["examples"])
            if item["hint"]:
                lines.append(f"    fix: {item['hint']}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def validate_manifest(
    manifest: pd.DataFrame,
    cfg: ValidateConfig,
    *,
    multi_label: bool = False,
    root: Path | str = ".",
) -> ValidationResult:
    """Run the data contract on a manifest; never raises for bad data, reports it instead.

    `multi_label` (`data.multi_label`): each `label` cell is a set "cat|dog", and the class
    rules (`validate.classes`, `min_classes`, `min_images_per_class`, `max_imbalance_ratio`)
    count individual labels. `root`: the folder the manifest's paths are relative to (the
    near-duplicate check reads the images).
    """
    if not isinstance(manifest, pd.DataFrame):
        raise DataContractError(
            f"validate_manifest: expected a pandas DataFrame (read the manifest with "
            f"imgcls.io.read_csv), got {type(manifest).__name__}"
        )
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    frames = build_frames(manifest, cfg, missing, multi_label, Path(root))
    checks = build_checks(cfg, frames, missing)
    outcomes = [outcome(c, res, frames, n) for c, res, n in run_suite(frames.tables, checks)]
    failures = [o for o in outcomes if not o["success"] and o["severity"] == "critical"]
    report = build_report(manifest, cfg, frames, outcomes)
    valid = frames.valid if not missing else manifest.iloc[0:0].copy()
    result = ValidationResult(
        ok=not failures,
        valid=valid,
        report=report,
        markdown="",
        failures=failures,
        near_pairs=frames.near_pairs,
    )
    result.markdown = render_markdown(report)
    return result
