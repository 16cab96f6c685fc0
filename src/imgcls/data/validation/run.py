"""The validate stage: read the manifest, run the contract, write valid rows and the reports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imgcls.data.sheets import contact_sheet
from imgcls.data.validation.contract import validate_manifest
from imgcls.data.validation.markdown import merged_group_strips, render_markdown
from imgcls.io import read_csv, write_csv, write_json, write_text

if TYPE_CHECKING:
    from imgcls.config import Params


@dataclass(frozen=True)
class ValidatePaths:
    """Where the validate stage reads and writes (as declared in dvc.yaml)."""

    manifest: Path
    valid: Path
    near_duplicates: Path
    report: Path
    markdown: Path
    figure: Path


def run_validate(paths: ValidatePaths, params: Params) -> tuple[bool, str]:
    """Validate the manifest and write every output; (ok, what to tell the user).

    On failure no declared output is touched (earlier good outputs and dvc.lock stay as they
    were); the full report goes to `validation-failed.md` beside the Markdown report instead.
    With `data.multi_label` the class rules count individual labels of "cat|dog" sets.
    """
    manifest = read_csv(paths.manifest)
    result = validate_manifest(manifest, params.validate_, multi_label=params.data.multi_label)
    if not result.ok:
        failed = paths.markdown.with_name("validation-failed.md")  # not a DVC output
        write_text(failed, result.markdown)
        return False, (
            f"{result.summary()}\n\nvalidate: data contract failed; full report in {failed}"
        )
    # The strips are always written (a declared output), a one-line note when nothing merged.
    strips = merged_group_strips(result.report) or [("no merged groups", [])]
    contact_sheet(strips, paths.figure)
    beside = paths.figure.parent == paths.markdown.parent
    figure = paths.figure.name if beside else str(paths.figure)
    write_csv(paths.valid, result.valid)
    write_csv(paths.near_duplicates, result.near_pairs)
    write_json(paths.report, json.loads(json.dumps(result.report, default=str)))
    write_text(paths.markdown, render_markdown(result.report, figure=figure))
    s = result.report["summary"]
    return True, (
        f"validate: {len(result.valid)} valid rows -> {paths.valid}; "
        f"{s['merged_groups']} merged groups ({s['merged_group_rows']} rows, largest "
        f"{s['largest_merged_group']}), {s['near_duplicate_verified_pairs']} verified "
        f"near-duplicate pairs -> {paths.near_duplicates}"
    )
