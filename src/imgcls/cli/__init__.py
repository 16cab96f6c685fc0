"""The `imgcls` command: helpers around the pipeline (`dvc repro` runs the stages themselves)."""

from __future__ import annotations

import argparse
import sys

import yaml

from imgcls import __version__
from imgcls.cli.models import add_predict_export_parsers
from imgcls.cli.runs import add_promote_parser, add_retrain_parser, add_summary_parser
from imgcls.cli.search import add_lr_find_parser, add_tune_parser
from imgcls.config import ConfigError, load_params
from imgcls.errors import ImgclsError


def _cmd_models(args: argparse.Namespace) -> None:
    """List our registered models and, optionally, timm names matching a pattern."""
    from imgcls.models import list_custom_models

    print("imgcls models: " + ", ".join(list_custom_models()))
    if args.timm:
        import timm

        names = timm.list_models(args.timm)
        print(f"timm models matching {args.timm!r} ({len(names)}):")
        for name in names:
            print(f"  {name}")
    else:
        print("any timm model name also works (list them with: imgcls models --timm 'resnet*')")


def _cmd_params(args: argparse.Namespace) -> None:
    """Validate a params file and print it with every default filled in."""
    params = load_params(args.params)
    print(yaml.safe_dump(params.to_dict(), sort_keys=False), end="")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    ap = argparse.ArgumentParser(
        prog="imgcls",
        description="Experiment-tracked image classification. Run the pipeline with `dvc repro`; "
        "these commands help around it.",
    )
    ap.add_argument("--version", action="version", version=f"imgcls {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("models", help="list model names usable as model.name")
    p.add_argument("--timm", metavar="PATTERN", help="also list timm models matching a pattern")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("params", help="validate params.yaml and print the resolved values")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.set_defaults(func=_cmd_params)
    add_summary_parser(sub)
    add_retrain_parser(sub)
    add_promote_parser(sub)
    add_predict_export_parsers(sub)
    add_lr_find_parser(sub)
    add_tune_parser(sub)
    from imgcls.compare import add_compare_parser  # the command's options live with it

    add_compare_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `imgcls` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ImgclsError, ConfigError) as err:
        print(f"imgcls {args.command}: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
