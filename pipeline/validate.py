"""Stage `validate`: run the data contract; write valid rows and reports, or fail with a summary."""

import argparse
import json
import sys
from pathlib import Path

from imgcls.config import load_params
from imgcls.data.near_duplicates import contact_sheet
from imgcls.data.validation import merged_group_strips, render_markdown, validate_manifest
from imgcls.io import read_csv, write_csv, write_json, write_text
from imgcls.stage import run_stage


def main() -> None:
    """Validate the manifest; on failure leave every earlier output untouched and exit 1."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifest", default="data/interim/manifest.csv", type=Path)
    ap.add_argument("--valid", default="data/interim/valid.csv", type=Path)
    ap.add_argument("--near-duplicates", default="data/interim/near_duplicates.csv", type=Path)
    ap.add_argument("--report", default="reports/validation.json", type=Path)
    ap.add_argument("--markdown", default="reports/validation.md", type=Path)
    ap.add_argument("--figure", default="reports/validation_groups.png", type=Path)
    args = ap.parse_args()
    params = load_params(args.params)
    # data.multi_label: class rules count individual labels of the "cat|dog" label sets
    result = validate_manifest(
        read_csv(args.manifest), params.validate_, multi_label=params.data.multi_label
    )
    if not result.ok:
        # Not a DVC output: earlier good outputs and dvc.lock stay as they were.
        failed = args.markdown.with_name("validation-failed.md")
        write_text(failed, result.markdown)
        print(result.summary(), file=sys.stderr)
        print(f"\nvalidate: data contract failed; full report in {failed}", file=sys.stderr)
        sys.exit(1)
    # The strips are always written (a declared output), a one-line note when nothing merged.
    strips = merged_group_strips(result.report) or [("no merged groups", [])]
    contact_sheet(strips, args.figure)
    figure = args.figure.name if args.figure.parent == args.markdown.parent else str(args.figure)
    write_csv(args.valid, result.valid)
    write_csv(args.near_duplicates, result.near_pairs)
    write_json(args.report, json.loads(json.dumps(result.report, default=str)))
    write_text(args.markdown, render_markdown(result.report, figure=figure))
    s = result.report["summary"]
    print(
        f"validate: {len(result.valid)} valid rows -> {args.valid}; "
        f"{s['merged_groups']} merged groups ({s['merged_group_rows']} rows, largest "
        f"{s['largest_merged_group']}), {s['near_duplicate_verified_pairs']} verified "
        f"near-duplicate pairs -> {args.near_duplicates}"
    )


if __name__ == "__main__":
    run_stage("validate", main)
