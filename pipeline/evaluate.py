"""Stage `evaluate`: test (and val) metrics, confusion matrix, figures; closes the MLflow run."""

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

from imgcls.config import load_params
from imgcls.evaluation.evaluate import evaluate_split
from imgcls.evaluation.metrics import confusion_long, plot_confusion
from imgcls.io import write_csv, write_json
from imgcls.models.bundle import load_bundle
from imgcls.stage import run_stage
from imgcls.tracking import Run
from imgcls.training.run import load_split_data


def main() -> None:
    """Evaluate the saved model on the configured splits and write metrics and figures."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--splits", default="data/processed/splits.csv", type=Path)
    ap.add_argument("--cache-dir", default="data/cache", type=Path)
    ap.add_argument("--model", default="models/model.pt", type=Path)
    ap.add_argument("--run-file", default="models/run.json", type=Path)
    ap.add_argument("--metrics", default="metrics/eval.json", type=Path)
    ap.add_argument("--confusion-csv", default="plots/confusion.csv", type=Path)
    ap.add_argument("--figures", default="reports/figures", type=Path)
    args = ap.parse_args()
    cfg = load_params(args.params).evaluate
    clf, meta = load_bundle(args.model)
    classes = meta["classes"]
    data = load_split_data(
        args.splits,
        Path.cwd(),
        meta["image_size"],
        meta["channels"],
        args.cache_dir,
        classes=classes,
    )
    flat: dict[str, float] = {}
    results = {}
    for split in cfg.splits:
        images, labels = data.part(split)
        if len(labels) == 0:
            continue
        res = evaluate_split(
            clf, split, images, labels, classes, top_k=cfg.top_k, batch_size=cfg.batch_size
        )
        results[split] = res
        prefix = "" if split == "test" else f"{split}_"
        flat.update({f"{prefix}{k}": v for k, v in res.metrics.items()})
    main_split = "test" if "test" in results else next(iter(results))
    main = results[main_split]
    write_json(args.metrics, flat)
    write_csv(args.confusion_csv, confusion_long(main.y_true, main.y_pred, classes))
    args.figures.mkdir(parents=True, exist_ok=True)
    figures = {
        "confusion_matrix.png": plot_confusion(main.confusion, classes, f"{main_split}: counts"),
        "confusion_matrix_normalized.png": plot_confusion(
            main.confusion, classes, f"{main_split}: row-normalised", normalize=True
        ),
    }
    for name, fig in figures.items():
        fig.savefig(args.figures / name)
        plt.close(fig)
    write_json(
        args.figures / "confusion_matrix.json",
        {"split": main_split, "classes": classes, "counts": main.confusion.tolist()},
    )

    run_info = json.loads(args.run_file.read_text()) if args.run_file.is_file() else {}
    if run_info.get("run_id"):
        run = Run(run_info["tracking_uri"], run_info["run_id"])
        run.log_metrics({(k if k.startswith("val_") else f"test_{k}"): v for k, v in flat.items()})
        run.log_artifact(args.figures, "evaluation")
        run.log_artifact(args.metrics, "evaluation")
        run.end("FINISHED")
    print(
        f"evaluate: {main_split} accuracy {main.metrics['accuracy']:.4f}, "
        f"macro F1 {main.metrics['f1_macro']:.4f} -> {args.metrics}"
    )


if __name__ == "__main__":
    run_stage("evaluate", main)
