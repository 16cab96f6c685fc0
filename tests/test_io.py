"""Atomic writes: all or nothing, with ordinary file permissions."""

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from imgcls.io import atomic_path, read_csv, write_csv, write_json


def test_failed_write_leaves_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_outputs_get_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644


def test_csv_round_trip_keeps_strings_and_ints(tmp_path: Path) -> None:
    df = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["01", ""], "width": [8, None]})
    write_csv(tmp_path / "x.csv", df)
    back = read_csv(tmp_path / "x.csv")
    assert back["label"].tolist() == ["01", ""]  # leading zeros and empty strings survive
    assert back["width"].tolist()[0] == 8 and pd.isna(back["width"].tolist()[1])
