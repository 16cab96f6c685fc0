"""Shared plumbing for the stage entry points in `pipeline/`: logging and user-facing errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from imgcls.config import ConfigError
from imgcls.errors import ImgclsError
from imgcls.io import disk_full_message, free_bytes, is_disk_full


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
    # MLflow draws a "Downloading artifacts" bar per model it logs or reloads: noise in every
    # stage log. Set before the logger process starts, so it inherits it; a user's value wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        main()
    except (ImgclsError, ConfigError) as err:
        print(f"\n{name} failed: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:
        if not is_disk_full(err):
            raise
        # A writer outside imgcls.io (a library's own) ran out of space: say so in English.
        where = err.filename2 or err.filename  # copyfile: filename2 is the destination
        print(f"\n{name} failed: {_full_disk(where)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n{name} interrupted; earlier outputs are unchanged", file=sys.stderr)
        sys.exit(130)


def _full_disk(where: str | bytes | int | None) -> str:
    """The disk-full message for the file the OS error named, or for the current folder."""
    if isinstance(where, str | bytes):
        return disk_full_message(os.fsdecode(where), atomic=False)
    free = free_bytes(os.getcwd())
    have = f"{free:,} bytes free in {os.getcwd()}" if free is not None else "free space unknown"
    return (
        f"a write failed: no space left on the disk ({have}). Free some space (df -h shows which "
        "filesystem), then run again."
    )
