"""Multi-label data (issue #10): labels CSV -> manifest -> data contract -> group-aware split.

Every test writes real PNG files and a real labels CSV; nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _imagefactory as fac
from imgcls.config import DataConfig, SplitConfig, ValidateConfig
from imgcls.data.manifest import build_manifest
from imgcls.data.sources import RESERVED_SEP_ERROR, parse_label_cell, read_labels_csv
from imgcls.data.split import (
    SPLITS,
    SplitError,
    assign_splits,
    multi_label_strata,
    split_report,
    stratum_min_groups,
)
from imgcls.data.validation import validate_manifest
from imgcls.io import read_csv, write_csv
from imgcls.task import split_labels

REPO = Path(__file__).resolve().parents[1]
# label set per group -> number of groups (2 images each): fox is the rare label (6 groups,
# 12 images), and "cat|fox" / "dog|fox" are combinations too rare to be strata of their own.
DESIGN: dict[str, int] = {"cat": 8, "dog": 8, "cat|dog": 8, "fox": 2, "dog|fox": 2, "cat|fox": 2}
# How each set is written in the CSV: any order, spaces, repeats; ingest makes them canonical.
WRITTEN = {"cat": " cat ", "dog": "dog|dog", "cat|dog": "dog | cat", "fox": "fox"}
WRITTEN |= {"dog|fox": "fox|dog", "cat|fox": "cat|fox|"}


# --------------------------------------------------------------------------- helpers


def write_dataset(root: Path, sep: str = "|", per_group: int = 2) -> Path:
    """Real PNGs under root/data/images/ and root/data/labels.csv (path,label,group)."""
    lines = ["path,label,group"]
    seed = 0
    for labels, n_groups in DESIGN.items():
        cell = WRITTEN[labels].replace("|", sep)
        for g in range(n_groups):
            group = f"{labels.replace('|', '+')}-{g:02d}"
            for i in range(per_group):
                seed += 1
                fac.png(root / "data/images" / f"{group}-{i}.png", (16, 16), seed=seed)
                lines.append(f'images/{group}-{i}.png,"{cell}",{group}')
    csv_path = root / "data/labels.csv"
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path


def ingest(root: Path, **data: object) -> pd.DataFrame:
    """The ingest stage's library call, round-tripped through CSV as validate reads it."""
    params = {"source": "data/labels.csv", "workers": 1, "group": {"by": "csv"}, **data}
    cfg = DataConfig.model_validate(params)
    df = build_manifest(cfg, root, root / "data/raw", progress=False)
    write_csv(root / "manifest.csv", df)
    return read_csv(root / "manifest.csv")


def labels_by_path(df: pd.DataFrame) -> dict[str, str]:
    """path -> label of a manifest."""
    return dict(zip(df["path"], df["label"], strict=True))


def per_label_split(out: pd.DataFrame) -> pd.DataFrame:
    """Rows per individual label (index) x split (columns)."""
    flat = out.assign(label=out["label"].map(split_labels)).explode("label")
    table = pd.crosstab(flat["label"], flat["split"])
    return table.reindex(columns=list(SPLITS), fill_value=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """(root, manifest) of the multi-label design, ingested once for the module."""
    root = tmp_path_factory.mktemp("ml")
    write_dataset(root)
    return root, ingest(root, multi_label=True)


# --------------------------------------------------------------------------- ingest


def test_label_cells_become_canonical_sets(dataset: tuple[Path, pd.DataFrame]) -> None:
    _, df = dataset
    assert (df["error"] == "").all(), df[df["error"] != ""]
    assert sorted(df["label"].unique()) == sorted(DESIGN)  # "dog | cat" -> "cat|dog" etc.
    assert df.groupby("label")["group"].nunique().to_dict() == DESIGN
    assert len(df) == 2 * sum(DESIGN.values())


@pytest.mark.parametrize(
    ("cell", "sep", "expected"),
    [
        ("dog|cat", "|", ("cat|dog", "")),
        (" dog ; cat ;dog", ";", ("cat|dog", "")),
        ("cat", "|", ("cat", "")),
        (" | ", "|", ("", "no label")),
        ("", ";", ("", "no label")),
        ("a|b;cat", ";", ("a|b;cat", RESERVED_SEP_ERROR)),
    ],
)
def test_parse_label_cell(cell: str, sep: str, expected: tuple[str, str]) -> None:
    assert parse_label_cell(cell, True, sep) == expected


def test_single_label_mode_keeps_a_joined_cell_as_one_class(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """multi_label: false changes nothing: "dog | cat" stays one (stripped) class name."""
    write_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="imgcls.data.sources"):
        df = ingest(tmp_path)
    assert set(df["label"]) == {"cat", "dog|dog", "dog | cat", "fox", "fox|dog", "cat|fox|"}
    assert "ONE class name because data.multi_label is false" in caplog.text
    assert parse_label_cell(" dog|cat ", False) == ("dog|cat", "")


def test_other_separator_quarantines_labels_holding_a_pipe(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_dataset(tmp_path, sep=";")
    with open(tmp_path / "data/labels.csv", "a", encoding="utf-8") as fh:
        fh.write('images/cat-00-0.png,"a|b;cat",extra\n')  # a second row for an existing file
        fh.write('images/cat-00-1.png," ; ",extra2\n')
    with caplog.at_level(logging.WARNING, logger="imgcls.data.sources"):
        files = read_labels_csv(
            tmp_path / "data/labels.csv",
            tmp_path / "data",
            "group",
            multi_label=True,
            separator=";",
        )
    good = [f for f in files if not f.error]
    assert {f.label for f in good} == set(DESIGN)
    bad = {f.label: f.error for f in files if f.error}
    assert bad == {"a|b;cat": RESERVED_SEP_ERROR, "": "no label"}
    assert "reserves to join labels" in caplog.text and "line(s) 62)" in caplog.text


def test_folder_source_gives_one_label_rows(tmp_path: Path) -> None:
    for label in ("cat", "dog", "a|b"):
        fac.class_folder(tmp_path / "data/images", label, 2)
    cfg = DataConfig.model_validate({"source": "data/images", "workers": 1, "multi_label": True})
    df = build_manifest(cfg, tmp_path, tmp_path / "data/raw", progress=False)
    ok = df[df["error"] == ""]
    assert sorted(ok["label"].unique()) == ["cat", "dog"]
    assert set(df.loc[df["label"] == "a|b", "error"]) == {RESERVED_SEP_ERROR}


# --------------------------------------------------------------------------- validate


def test_validation_counts_individual_labels(dataset: tuple[Path, pd.DataFrame]) -> None:
    _, df = dataset
    result = validate_manifest(df, ValidateConfig(min_images_per_class=10), multi_label=True)
    assert result.ok, result.summary()
    labels = result.report["labels"]
    assert labels["found"] == ["cat", "dog", "fox"]
    assert labels["counts"] == {"cat": 36, "dog": 36, "fox": 12}  # images carrying each label
    assert labels["multi_label"] is True
    assert labels["combinations"]["cat|dog"] == 16 and len(labels["combinations"]) == 6
    assert result.report["summary"]["classes"] == 3
    assert "3 labels in 6 combinations" in result.markdown
    assert "## Labels (images carrying each label)" in result.markdown
    assert "| cat\\|dog | 16 |" in result.markdown  # combinations table, '|' escaped
    json.dumps(result.report, allow_nan=False)
    # single-label mode would count six "classes" (the combinations) instead
    single = validate_manifest(df, ValidateConfig(min_images_per_class=10), multi_label=False)
    assert single.report["labels"]["counts"]["fox"] == 4 and not single.ok


def test_rare_label_fails_the_per_label_minimum(dataset: tuple[Path, pd.DataFrame]) -> None:
    _, df = dataset
    result = validate_manifest(df, ValidateConfig(min_images_per_class=13), multi_label=True)
    assert not result.ok
    [failure] = result.failures
    assert failure["title"] == "at least 13 images per label"
    assert failure["problem"] == "1 of 3 classes (12 rows): fox (12)"
    assert failure["examples"][0].endswith("(label='fox')")
    assert "lower `validate.min_images_per_class`" in result.summary()


def test_imbalance_and_configured_classes_apply_to_labels(
    dataset: tuple[Path, pd.DataFrame],
) -> None:
    _, df = dataset
    cfg = ValidateConfig(min_images_per_class=1, max_imbalance_ratio=2.0, classes=["cat", "dog"])
    result = validate_manifest(df, cfg, multi_label=True)
    titles = [f["title"] for f in result.failures]
    assert titles == [
        "every label within the configured classes (cat, dog)",
        "label imbalance (largest / smallest label) at most 2",
    ]
    unknown = result.failures[0]
    assert unknown["problem"].startswith("12 of 84 rows")  # 12 (image, label) rows carry fox
    assert all("(label='fox')" in ex for ex in unknown["examples"])
    assert "observed 3.0, expected at most 2" in result.failures[1]["problem"]


def test_malformed_label_set_in_a_hand_made_manifest_fails(
    dataset: tuple[Path, pd.DataFrame],
) -> None:
    _, df = dataset
    bad = df.copy()
    bad.loc[0, "label"] = "cat||dog"
    result = validate_manifest(bad, ValidateConfig(min_images_per_class=1), multi_label=True)
    assert [f["title"] for f in result.failures] == [
        "each label set is non-empty labels joined by '|'"
    ]
    assert "cat||dog" in result.failures[0]["examples"][0]


# --------------------------------------------------------------------------- split


def test_split_keeps_groups_whole_and_every_label_in_every_split(
    dataset: tuple[Path, pd.DataFrame],
) -> None:
    _, df = dataset
    valid = validate_manifest(df, ValidateConfig(min_images_per_class=1), multi_label=True).valid
    out = assign_splits(valid, SplitConfig(), seed=3, multi_label=True)
    assert out["path"].tolist() == valid["path"].tolist()
    assert (out.groupby("group")["split"].nunique() == 1).all()
    table = per_label_split(out)
    assert (table > 0).all().all(), table  # fox has 6 groups: enough for every split
    assert table.loc["fox", "train"] >= table.loc["fox", "val"]
    report = split_report(out, SplitConfig(), multi_label=True)
    assert report["multi_label"] is True
    assert report["counts"] == {
        label: {s: int(row[s]) for s in SPLITS} for label, row in table.iterrows()
    }
    assert report["classes"] == 3 and report["rows"] == len(out)
    assert sum(report["splits"][s]["rows"] for s in SPLITS) == len(out)
    combos = report["label_combinations"]
    assert sum(sum(v.values()) for v in combos.values()) == len(out)
    assert report["strata"]["min_groups"] == 7
    # 8-group combinations are strata; the 2-group ones are pooled by their rarest label, fox
    assert report["strata"]["stratified"] == 3
    assert report["strata"]["pooled_by_rarest_label"] == {"fox": ["cat|fox", "dog|fox", "fox"]}
    assert report["leakage"]["no_shared_group"] is True
    json.dumps(report, allow_nan=False)
    again = assign_splits(
        valid.sample(frac=1.0, random_state=1), SplitConfig(), 3, multi_label=True
    )
    assert dict(zip(again["path"], again["split"], strict=True)) == dict(
        zip(out["path"], out["split"], strict=True)
    )


def test_single_label_split_treats_a_set_as_one_class(
    dataset: tuple[Path, pd.DataFrame],
) -> None:
    """multi_label=False (the default) keeps today's behaviour: the cell is the class."""
    _, df = dataset
    out = assign_splits(df, SplitConfig(), seed=0)
    report = split_report(out, SplitConfig())
    assert set(report["counts"]) == set(DESIGN) and "multi_label" not in report


def rows_for(groups: list[tuple[str, int]]) -> pd.DataFrame:
    """Splits-shaped rows: one group per entry (label set, images)."""
    rows = []
    for g, (labels, n) in enumerate(groups):
        for i in range(n):
            rows.append(
                {
                    "path": f"p{g}_{i}.png",
                    "label": labels,
                    "group": f"g{g:03d}",
                    "source_split": "",
                    "sha256": f"{g:032x}{i:032x}",
                }
            )
    return pd.DataFrame(rows)


def test_rare_labels_get_train_rows_first() -> None:
    """A label with one group lands in train; with two, in train and one other split."""
    groups = [("a", 1)] * 40 + [("b", 1)] * 40 + [("a|b", 1)] * 20
    groups += [("a|solo", 3), ("b|pair", 2), ("pair", 1)]
    out = assign_splits(rows_for(groups), SplitConfig(), seed=0, multi_label=True)
    table = per_label_split(out)
    assert table.loc["solo", "train"] == 3
    assert table.loc["pair", "train"] > 0 and (table.loc["pair", ["val", "test"]] > 0).any()


LABELS = st.sets(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(LABELS, st.integers(1, 4)), min_size=3, max_size=60),
    st.integers(0, 3),
)
def test_invariants_on_random_multi_label_groups(
    groups: list[tuple[set[str], int]], seed: int
) -> None:
    """Every row gets a split, no group straddles, every label reaches train where possible."""
    data = rows_for([("|".join(sorted(s)), n) for s, n in groups])
    out = assign_splits(data, SplitConfig(), seed=seed, multi_label=True)
    assert out["split"].isin(SPLITS).all() and len(out) == len(data)
    assert (out.groupby("group")["split"].nunique() == 1).all()
    # Train misses a label only when each of its groups is the one group of another split
    # (too few groups for three splits: nothing can move without emptying a split).
    train = per_label_split(out)["train"]
    per_split = out.groupby("split")["group"].nunique()
    for label in train[train == 0].index:
        holding = out[out["label"].map(lambda x, lab=label: lab in split_labels(x))]
        assert (per_split[holding["split"].unique()] == 1).all(), (label, out)


def test_stable_split_keeps_old_groups_when_data_grows() -> None:
    old = rows_for([("a", 1)] * 30 + [("b", 1)] * 30 + [("a|b", 1)] * 30)
    first = assign_splits(old, SplitConfig(), seed=0, multi_label=True)
    grown = rows_for([("a", 1)] * 30 + [("b", 1)] * 30 + [("a|b", 1)] * 30 + [("c|a", 1)] * 20)
    grown["label"] = grown["label"].map(lambda x: "|".join(sorted(x.split("|"))))
    second = assign_splits(grown, SplitConfig(), seed=0, previous=first, multi_label=True)
    before = dict(zip(first["path"], first["split"], strict=True))
    assert all(second.set_index("path").loc[p, "split"] == s for p, s in before.items())
    assert (per_label_split(second).loc["c"] > 0).all()


def test_a_label_set_without_labels_is_a_clear_split_error() -> None:
    data = rows_for([("a", 1)] * 5 + [("|", 1)])
    with pytest.raises(SplitError, match=r"1 row\(s\) whose label set holds no label"):
        assign_splits(data, SplitConfig(), seed=0, multi_label=True)


def test_strata_threshold_follows_the_smallest_split() -> None:
    assert stratum_min_groups(pd.Series([0.7, 0.15, 0.15]).to_numpy()) == 7
    assert stratum_min_groups(pd.Series([0.8, 0.2, 0.0]).to_numpy()) == 5
    assert stratum_min_groups(pd.Series([1.0, 0.0, 0.0]).to_numpy()) == 1
    labels = pd.Series(["a"] * 7 + ["a|b"] * 2 + ["b|c"])
    strata = multi_label_strata(labels, pd.RangeIndex(10).to_numpy(), 7)
    assert strata.stratum == {"a": "combination:a", "a|b": "rare:b", "b|c": "rare:c"}
    assert strata.pooled == {"b": ["a|b"], "c": ["b|c"]}


# --------------------------------------------------------------------------- stages


def run_stage(root: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run pipeline/<script> in `root` the way dvc.yaml does."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, str(REPO / "pipeline" / script), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ingest_validate_split_stages_in_multi_label_mode(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(
        source="data/labels.csv", multi_label=True, group={"by": "csv"}, workers=1
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ingest_run = run_stage(tmp_path, "ingest.py")
    assert ingest_run.returncode == 0, ingest_run.stderr
    assert "3 labels in 6 combinations" in ingest_run.stdout
    params["validate"]["min_images_per_class"] = 13  # fox has 12 images: fails on purpose
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    validate_run = run_stage(tmp_path, "validate.py")
    assert validate_run.returncode == 1
    assert "at least 13 images per label" in validate_run.stderr
    assert "fox (12)" in validate_run.stderr
    params["validate"]["min_images_per_class"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(tmp_path, "validate.py").returncode == 0
    split_run = run_stage(tmp_path, "split.py")
    assert split_run.returncode == 0, split_run.stderr
    splits = read_csv(tmp_path / "data/processed/splits.csv")
    assert set(splits["label"]) == set(DESIGN)
    assert (per_label_split(splits)["train"] > 0).all()
    report = json.loads((tmp_path / "reports/split.json").read_text())
    assert set(report["counts"]) == {"cat", "dog", "fox"}
