"""Shared plumbing for the stage entry points in `pipeline/`: logging and user-facing errors."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from imgcls.config import ConfigError
from imgcls.errors import ImgclsError
from imgcls.io import disk_full_message, free_bytes, is_disk_full

RANK_EXIT_DELAY_S = 2.0  # how long a rank other than 0 waits before it exits on an error


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
        fail(f"{name} failed: {err}")
    except OSError as err:
        if not is_disk_full(err):
            raise
        # A writer outside imgcls.io (a library's own) ran out of space: say so in English.
        where = err.filename2 or err.filename  # copyfile: filename2 is the destination
        fail(f"{name} failed: {_full_disk(where)}")
    except KeyboardInterrupt:
        fail(f"{name} interrupted; earlier outputs are unchanged", 130)


def rank() -> int:
    """This process's rank under torchrun (0 without it, or when RANK is not a number)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def fail(message: str, code: int = 1) -> NoReturn:
    """Say `message` once and exit with `code`.

    Under torchrun every rank meets the same error: only rank 0 prints it. Each rank also
    hands it to torchrun (its error file), whose closing failure summary would otherwise say
    only "To enable traceback see ..."; a rank that fails alone is thus still explained.
    """
    if rank() == 0:
        print(f"\n{message}", file=sys.stderr)
    elif code == 1:  # not on Ctrl-C, which every rank gets at once
        # torchrun stops every rank once one exits: let rank 0, which almost always fails the
        # same way, speak first; a rank that fails alone still explains itself below
        time.sleep(RANK_EXIT_DELAY_S)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as fp:
                # torchrun's own layout (errors.ErrorHandler.record_exception), without the
                # call stack, so its summary quotes the message itself
                info = {"timestamp": str(int(time.time()))}
                json.dump({"message": {"message": message, "extraInfo": info}}, fp)
        except OSError:
            pass  # torchrun's own summary is a courtesy; the exit code is what counts
    sys.exit(code)


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
