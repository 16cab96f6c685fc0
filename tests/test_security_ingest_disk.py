"""A full disk on a REAL small filesystem (a 256 KiB tmpfs): one clear message, old files intact."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import _imagefactory as fac
from _localhttp import local_server
from imgcls.data.sources.archive import extract_archive
from imgcls.data.sources.download import download
from imgcls.errors import ImgclsError
from imgcls.io import write_csv, write_json
from imgcls.stage import run_stage
from imgcls.training import checkpoint

SIZE = 256 * 1024  # the `small_fs` fixture's size (conftest.py)


def _incompressible(n: int, seed: int = 0) -> bytes:
    """Random bytes: what no filesystem or archive can shrink."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Names in `folder` other than `keep` (temporary files a failed write left behind)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _says_disk_full(message: str, path: Path) -> None:
    """The one message: the file, that the disk is full, and how much is free."""
    assert str(path) in message
    assert "no space left" in message.lower()
    assert "free" in message and "bytes" in message


def test_csv_writer_on_a_full_disk_says_so_and_keeps_the_old_file(small_fs: Path) -> None:
    target = small_fs / "manifest.csv"
    write_csv(target, pd.DataFrame({"path": ["a.png"], "label": ["cat"]}))
    before = target.read_bytes()
    big = pd.DataFrame({"path": [f"data/raw/x/{i:08d}.png" for i in range(40_000)], "label": "c"})
    with pytest.raises(ImgclsError) as err:
        write_csv(target, big)
    _says_disk_full(str(err.value), target)
    assert target.read_bytes() == before
    assert _leftovers(small_fs, {"manifest.csv"}) == []


def test_json_writer_on_a_full_disk_says_so(small_fs: Path) -> None:
    target = small_fs / "report.json"
    with pytest.raises(ImgclsError) as err:
        write_json(target, {"x": "y" * (2 * SIZE)})
    _says_disk_full(str(err.value), target)
    assert _leftovers(small_fs, set()) == []


def test_checkpoint_on_a_full_disk_names_bytes_needed_and_free(small_fs: Path) -> None:
    target = small_fs / "last.pt"
    checkpoint.save(target, {"w": torch.arange(10.0)})
    before = target.read_bytes()
    with pytest.raises(ImgclsError) as err:
        checkpoint.save(target, {"w": torch.zeros(200_000)})  # ~800 KB
    message = str(err.value)
    _says_disk_full(message, target)
    assert re.search(r"needs 80\d,\d{3} bytes", message)  # serialised size, known before writing
    assert target.read_bytes() == before
    assert torch.equal(checkpoint.load(target)["w"], torch.arange(10.0))
    assert _leftovers(small_fs, {"last.pt"}) == []


def test_download_onto_a_full_disk_says_so(small_fs: Path) -> None:
    data = _incompressible(600_000)
    dest = small_fs / "downloads" / "big.zip"
    with local_server() as server:
        server.files["big.zip"] = data
        with pytest.raises(ImgclsError) as err:
            download(server.base + "big.zip", "0" * 64, dest, progress=False)
    message = str(err.value)
    _says_disk_full(message, dest.with_name("big.zip.part"))
    assert "600,000" in message  # what the server announced
    assert _leftovers(dest.parent, set()) == []  # the partial file is removed to free the space


def test_extraction_onto_a_full_disk_keeps_the_previous_folder(
    tmp_path: Path, small_fs: Path
) -> None:
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(fac.png(tmp_path / "build" / "a.png"), "cat/a.png")
    target = small_fs / "pets"
    extract_archive(archive, target, 10**9)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            zf.writestr(f"cat/{i}.png", _incompressible(100_000, seed=i))
    with pytest.raises(ImgclsError) as err:
        extract_archive(archive, target, 10**9)
    message = str(err.value)
    assert "no space left" in message.lower() and "free" in message and str(archive) in message
    assert "damaged" not in message
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert _leftovers(small_fs, {"pets"}) == []


def test_a_stage_that_fills_the_disk_prints_one_message(
    tmp_path: Path, small_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(_incompressible(2 * SIZE))
    target = small_fs / "copy.bin"

    def fill() -> None:
        shutil.copyfile(source, target)  # a writer outside imgcls.io, e.g. a library's own

    with pytest.raises(SystemExit) as exit_info:
        run_stage("train", fill)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "train failed" in err and "Traceback" not in err
    _says_disk_full(err, target)
