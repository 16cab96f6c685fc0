"""`imgcls predict` and `imgcls export` (see docs/predict.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _model_args(p: argparse.ArgumentParser) -> None:
    """--model / --model-uri, shared by predict and export."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--model",
        type=Path,
        help="model file written by the train stage (default: models/model.pt), or an MLflow "
        "model URI such as models:/imgcls@champion",
    )
    g.add_argument(
        "--model-uri",
        metavar="URI",
        help="an MLflow model instead: runs:/<run_id>/model or models:/<name>/<version>",
    )


def _cmd_predict(args: argparse.Namespace) -> None:
    """Predict files / folders / globs and print or write a table, CSV or JSON."""
    from imgcls.inference import predict
    from imgcls.io import write_csv, write_json, write_text

    fmt = args.format or _format_from_suffix(args.output)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = None if args.model_uri else (args.model or Path("models/model.pt"))
    predictor = predict.load_predictor(model, args.model_uri, args.device)
    preds = predict.predict_paths(
        predictor,
        args.paths,
        batch_size=args.batch_size,
        top_k=args.top_k,
        workers=args.workers,
        progress=not args.no_progress,
    )
    k = min(args.top_k, len(predictor.classes))
    if fmt == "csv":
        frame = predict.to_frame(preds, k)
        text = None if args.output else frame.to_csv(index=False)
        if args.output:
            write_csv(args.output, frame)
    elif fmt == "json":
        records = predict.to_records(preds)
        text = None if args.output else json.dumps(records, indent=2) + "\n"
        if args.output:
            write_json(args.output, records)
    else:
        text = predict.format_table(preds)
        if args.output:
            write_text(args.output, text)
            text = None
    if text is not None:
        sys.stdout.write(text)
    failed = sum(p.error is not None for p in preds)
    if failed == len(preds):
        raise predict.PredictError(f"none of the {len(preds)} inputs could be predicted")
    if failed:
        print(
            f"imgcls predict: {failed} of {len(preds)} inputs failed (see their error rows)",
            file=sys.stderr,
        )
    elif args.output:
        print(f"imgcls predict: {len(preds)} predictions -> {args.output}", file=sys.stderr)


def _format_from_suffix(output: Path | None) -> str:
    """csv / json from the output file's suffix, else the readable table."""
    suffix = output.suffix.lower() if output else ""
    return {".csv": "csv", ".json": "json"}.get(suffix, "table")


def _cmd_export(args: argparse.Namespace) -> None:
    """Export to ONNX or TorchScript and check it against PyTorch."""
    from imgcls.inference import export
    from imgcls.inference.predict import load_predictor

    model = None if args.model_uri else (args.model or Path("models/model.pt"))
    predictor = load_predictor(model, args.model_uri, "cpu")
    out = args.output or export.default_output(model or Path("models/model.pt"), args.format)
    export.export_model(predictor.model, predictor.meta, args.format, out)
    if args.no_verify:
        print(f"imgcls export: {args.format} model -> {out} (not verified)")
        return
    diff = export.verify_export(predictor.model, out, args.format)
    print(f"imgcls export: {args.format} model -> {out} (max |p - p_torch| = {diff:.1e})")


def add_predict_export_parsers(sub: argparse._SubParsersAction) -> None:
    """`imgcls predict` and `imgcls export` (see docs/predict.md)."""
    p = sub.add_parser(
        "predict",
        help="predict image files, folders or globs with a trained model",
        description="Predict images with the trained model; preprocessing (size, channels, "
        "normalisation, class names) comes from the model itself. See docs/predict.md.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, globs ('**')")
    _model_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (auto)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (64)")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image (3)")
    p.add_argument("--format", choices=["table", "csv", "json"], help="default: from --output")
    p.add_argument("--output", "-o", type=Path, help="write here instead of stdout (atomic)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (default: up to 4)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's, one per core)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)
    p = sub.add_parser(
        "export",
        help="export the model to ONNX or TorchScript (uint8 images in, probabilities out)",
        description="Export the trained model with its metadata; the export is checked against "
        "PyTorch (max probability difference 1e-4). See docs/predict.md.",
    )
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    _model_args(p)
    p.add_argument(
        "--output", "-o", type=Path, help="default: models/model.onnx / models/model.torchscript.pt"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    p.set_defaults(func=_cmd_export)
