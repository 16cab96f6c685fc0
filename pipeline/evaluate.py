"""Stage `evaluate`: test (and val) metrics and figures; logs the models to the train run."""

import argparse
from pathlib import Path

from imgcls.config import load_params
from imgcls.evaluation.evaluate import summary_line
from imgcls.evaluation.stage import EvaluatePaths, run_evaluate_stage
from imgcls.stage import run_stage


def main() -> None:
    """Evaluate models/model.pt on the configured splits; write metrics, figures, model URIs."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--splits", default="data/processed/splits.csv", type=Path)
    ap.add_argument("--cache-dir", default="data/cache", type=Path)
    ap.add_argument("--model", default="models/model.pt", type=Path)
    ap.add_argument("--run-file", default="models/run.json", type=Path)
    ap.add_argument("--metrics", default="metrics/eval.json", type=Path)  # headline (DVC metric)
    ap.add_argument("--details", default="reports/eval_details.json", type=Path)  # every key
    ap.add_argument("--confusion-csv", default="plots/confusion.csv", type=Path)
    ap.add_argument("--figures", default="reports/figures", type=Path)
    ap.add_argument("--logged-models", default="models/logged_models.json", type=Path)
    args = vars(ap.parse_args())
    params = load_params(args.pop("params"))

    report = run_evaluate_stage(EvaluatePaths(root=Path.cwd(), **args), params)
    print(f"evaluate: {summary_line(report.main)} -> {args['metrics']}")


if __name__ == "__main__":
    run_stage("evaluate", main)
