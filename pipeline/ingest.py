"""Stage `ingest`: materialise the configured sources under data/raw and write the manifest."""

import argparse
from pathlib import Path

from imgcls.config import load_params
from imgcls.data.manifest import run_ingest
from imgcls.stage import run_stage


def main() -> None:
    """Parse arguments, build the manifest, write it atomically."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--raw-dir", default="data/raw", type=Path)
    ap.add_argument("--manifest", default="data/interim/manifest.csv", type=Path)
    args = ap.parse_args()
    params = load_params(args.params)
    print(run_ingest(params.data, Path.cwd(), args.raw_dir, args.manifest))


if __name__ == "__main__":
    run_stage("ingest", main)
