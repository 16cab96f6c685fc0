"""Stage `validate`: run the data contract; write valid rows and reports, or fail with a summary."""

import argparse
import sys
from pathlib import Path

from imgcls.config import load_params
from imgcls.data.validation import ValidatePaths, run_validate
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
    args = vars(ap.parse_args())
    params = load_params(args.pop("params"))
    ok, message = run_validate(ValidatePaths(**args), params)
    print(message, file=sys.stdout if ok else sys.stderr)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    run_stage("validate", main)
