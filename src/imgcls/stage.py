"""Shared plumbing for the stage entry points in `pipeline/`: logging and user-facing errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from imgcls.config import ConfigError
from imgcls.errors import ImgclsError


def setup_logging(verbose: bool = False) -> None:
    """One-line, timestamp-free log records on stderr (DVC shows them as the stage runs)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname).1s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("mlflow", "alembic", "urllib3", "great_expectations", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage; known errors become one readable message and exit code 1, never a traceback."""
    setup_logging()
    try:
        main()
    except (ImgclsError, ConfigError) as err:
        print(f"\n{name} failed: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n{name} interrupted; earlier outputs are unchanged", file=sys.stderr)
        sys.exit(130)
