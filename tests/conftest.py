"""Shared fixtures. Helpers that test modules import live in tests/_*.py (e.g. _datasets.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from _datasets import with_splits, write_pattern_dataset


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """Undo `mlflow.set_tracking_uri` after each test: it also exports MLFLOW_TRACKING_URI."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # resets the global and unsets the env var
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(autouse=True)
def _pillow_pixel_limit_restored():
    """Undo `imageinfo.open_image`'s process-wide `Image.MAX_IMAGE_PIXELS` after each test.

    A test that decodes with a tiny limit must not make a later test in the same worker refuse
    its own screenshot as a decompression bomb.
    """
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = saved


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one torch thread, above all on a shared, loaded 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pattern_splits(tmp_path: Path) -> tuple[Path, Path]:
    """(root, splits.csv) of a 3-class, 90-image real PNG dataset."""
    df = with_splits(write_pattern_dataset(tmp_path))
    splits = tmp_path / "data/processed/splits.csv"
    splits.parent.mkdir(parents=True)
    df.to_csv(splits, index=False)
    return tmp_path, splits


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[object]:
    """A real `mlflow server` on 127.0.0.1 for one test, always terminated (_mlflow_server.py)."""
    from _mlflow_server import start_server

    server = start_server(tmp_path / "server")
    try:
        yield server
    finally:
        server.stop()


SMALL_FS_BYTES = 256 * 1024  # the size of `small_fs`


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted inside tmp_path (needs root; skipped, with the reason, if not)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; run as root to test a full disk")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
