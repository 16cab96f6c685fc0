"""The manifest cut into the frames the suite runs on, with duplicates merged into groups.

Expectations run on small frames derived from the manifest, each with a key column that turns
GX's unexpected values back into example paths:

- ``manifest``: every row (structure, quarantine threshold), keyed by ``path``;
- ``images``: rows that decoded (labels, sizes, modes, hashes), keyed by ``path``;
- ``classes``: one row per class (counts, imbalance), keyed by ``label``;
- ``labels`` (multi-label data only): one row per (image, individual label), keyed by ``path``:
  the class rules (configured classes, minimum count) apply to single labels, not to the label
  sets ("cat|dog") stored in the manifest;
- ``sha256``: one row per exact-duplicate set (conflicting labels), keyed by ``sha256``;
- ``near_duplicates``: one row per near-duplicate cluster (conflicting labels), keyed by
  ``cluster``;
- ``merged_groups``: one row per group that merging duplicates changed (classes it gained, its
  largest share of a class), keyed by ``group``.

Near-duplicates are found by :mod:`imgcls.data.near_duplicates` (pHash candidates verified on
the pixels, bounded clusters: no chaining), which reads the image files under ``root``; the
merging rule itself is :mod:`imgcls.data.grouping`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from imgcls.data.grouping import merge_duplicates
from imgcls.data.near_duplicates import NearDuplicates, find_near_duplicates
from imgcls.data.validation.common import LARGEST_SHOWN, MAX_EXAMPLES, as_text
from imgcls.task import split_labels

if TYPE_CHECKING:
    from imgcls.config import ValidateConfig


@dataclass
class Frames:
    """The manifest cut into the frames the suite runs on, plus grouping results."""

    tables: dict[str, pd.DataFrame]  # batch name -> frame handed to GX
    rows: dict[str, pd.DataFrame]  # batch name -> image rows (path, label, key) for examples
    valid: pd.DataFrame  # rows that pass, groups merged
    duplicates: list[dict[str, Any]]
    clusters: list[dict[str, Any]]
    class_counts: dict[str, int]  # per individual label in multi-label mode
    found_labels: list[str]
    multi_label: bool = False
    combinations: dict[str, int] = field(default_factory=dict)  # multi-label: images per set
    near: NearDuplicates | None = None
    near_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    merged: list[dict[str, Any]] = field(default_factory=list)  # the largest merged groups


def _nullify(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of the manifest where empty / blank strings are nulls, so GX sees them as missing."""
    out = df.copy()
    for col in out.columns:
        if col in ("width", "height"):
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
        elif out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            s = out[col].astype("string").str.strip()
            out[col] = s.mask(s == "")
    return out


def build_frames(
    manifest: pd.DataFrame,
    cfg: ValidateConfig,
    missing: list[str],
    multi_label: bool = False,
    root: Path = Path("."),
) -> Frames:
    """Build every frame the suite needs; with missing columns only the raw manifest."""
    table = _nullify(manifest.reset_index(drop=True))
    if missing:
        empty = pd.DataFrame()
        return Frames({"manifest": table}, {}, empty, [], [], {}, [], multi_label)
    decoded = table["error"].isna().to_numpy()
    images = table[decoded]
    # The rows the class rules count: one per image, or one per (image, label) for label sets.
    labelled = _explode_labels(images) if multi_label else images
    found = sorted(labelled["label"].dropna().unique().tolist())
    counts = _class_counts(labelled, cfg.classes)
    sha_table, duplicates = _exact_duplicates(images)
    near = find_near_duplicates(
        images["path"].astype(str),
        images["sha256"],
        images["phash"],
        cfg.near_duplicate_threshold,
        cfg.near_duplicate_similarity,
        root,
        sizes=images[["width", "height"]].fillna(-1).to_numpy(dtype=np.int64),
        max_detail_difference=cfg.near_duplicate_max_detail_difference,
    )
    cluster_table, clusters = _near_duplicate_clusters(images, near)
    valid = manifest.reset_index(drop=True)[decoded].copy()
    valid["group"] = merge_duplicates(images, near.centre, near.cluster)
    merged_table, merged = _merged_group_table(images, valid["group"].to_numpy(), multi_label)
    tables = {
        "manifest": table,
        "images": images,
        "classes": counts,
        "sha256": sha_table,
        "near_duplicates": cluster_table,
        "merged_groups": merged_table,
    }
    # example rows per batch: which image rows a key value (class, digest, cluster) stands for
    cluster_rows = _cluster_rows(images, clusters)
    rows = {
        "manifest": table.assign(key=table["path"]),
        "images": images.assign(key=images["path"]),
        "classes": labelled.assign(key=labelled["label"]),
        "sha256": images.assign(key=images["sha256"]),
        "near_duplicates": cluster_rows,
        "merged_groups": images.assign(key=valid["group"].to_numpy()),
    }
    combinations: dict[str, int] = {}
    if multi_label:
        tables["labels"] = labelled
        rows["labels"] = labelled.assign(key=labelled["path"])
        sets = images["label"].dropna().astype(str).value_counts()
        # most frequent first, ties by name, so the report reads the same on every run
        order = sorted(sets.items(), key=lambda kv: (-kv[1], kv[0]))
        combinations = {k: int(v) for k, v in order}
    class_counts = dict(zip(counts["label"], counts["images"].astype(int), strict=True))
    return Frames(
        tables,
        rows,
        valid,
        duplicates,
        clusters,
        class_counts,
        found,
        multi_label,
        combinations,
        near,
        near.pair_table(images["path"].astype(str).to_numpy()),
        merged,
    )


def _explode_labels(images: pd.DataFrame) -> pd.DataFrame:
    """One row per (image, individual label) of multi-label rows; a null label stays null."""
    parts = images["label"].map(lambda v: split_labels(v) if isinstance(v, str) else [])
    out = images.assign(label=parts).explode("label")
    out["label"] = out["label"].astype("string")
    return out.reset_index(drop=True)


def _class_counts(images: pd.DataFrame, classes: list[str] | None) -> pd.DataFrame:
    """One row per class: image count and ratio to the smallest non-empty class."""
    counts = images["label"].dropna().value_counts()
    if classes:
        # a configured class with no images must show up (and fail min_images_per_class)
        counts = counts.reindex(sorted(set(classes) | set(counts.index)), fill_value=0)
    counts = counts.sort_index()
    smallest = counts[counts > 0].min() if (counts > 0).any() else 0
    ratio = counts / smallest if smallest else counts * 0.0
    return pd.DataFrame(
        {"label": counts.index.astype(str), "images": counts.to_numpy(), "ratio": ratio.to_numpy()}
    )


def _exact_duplicates(images: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Frame of sha256 digests shared by several files, and the report entries for them."""
    sub = images.dropna(subset=["sha256"])
    dup = sub[sub["sha256"].duplicated(keep=False)]
    entries = [
        {"sha256": digest, **members, "conflicting_labels": len(members["labels"]) > 1}
        for digest, members in sorted(_members(dup["sha256"], dup).items())
    ]
    table = pd.DataFrame(
        {
            "sha256": pd.Series([e["sha256"] for e in entries], dtype=object),
            "labels": pd.Series([len(e["labels"]) for e in entries], dtype="int64"),
        }
    )
    return table, entries


def _members(keys: pd.Series, rows: pd.DataFrame) -> dict[Any, dict[str, list[str]]]:
    """Sorted paths and distinct labels per key (a plain loop: thousands of tiny groups)."""
    out: dict[Any, dict[str, list[str]]] = {}
    for key, path, label in zip(keys, rows["path"], rows["label"], strict=True):
        entry = out.setdefault(key, {"paths": [], "labels": []})
        entry["paths"].append(str(path))
        text = as_text(label)
        if text and text not in entry["labels"]:
            entry["labels"].append(text)
    for entry in out.values():
        entry["paths"].sort()
        entry["labels"].sort()
    return out


def _merged_group_table(
    images: pd.DataFrame, merged: np.ndarray, multi_label: bool
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One row per group that merging changed (largest first), and report entries for the top.

    Columns: rows, files, `new_classes` (classes beyond those of its largest original group:
    a person's group may hold every class; a merge that *adds* one joined different things)
    and `class_share` (the largest share of a class the group holds). Vectorised: a dataset
    with many duplicates has as many merged groups.
    """
    cols = ["group", "rows", "files", "original_groups", "new_classes", "class_share"]
    frame = pd.DataFrame(
        {
            "group": merged,
            "original": images["group"].fillna(images["path"]).astype(str).to_numpy(),
            "label": images["label"].astype(str).to_numpy(),
            "sha256": images["sha256"].astype(str).to_numpy(),
            "path": images["path"].astype(str).to_numpy(),
        }
    )
    if multi_label:
        frame = frame.assign(label=frame["label"].map(split_labels)).explode("label")
    n_orig = frame.groupby("group")["original"].nunique()
    sub = frame[frame["group"].isin(n_orig.index[n_orig > 1])]
    if sub.empty:
        empty = {c: pd.Series(dtype=object if c == "group" else float) for c in cols}
        return pd.DataFrame(empty), []
    per_group = sub.groupby("group")
    per_cell = sub.groupby(["group", "label"]).size()  # rows of each class in each group
    class_total = frame["label"].value_counts()
    share = per_cell / class_total.reindex(per_cell.index.get_level_values("label")).to_numpy()
    orig_classes = sub.groupby(["group", "original"])["label"].nunique().groupby(level=0).max()
    table = pd.DataFrame(
        {
            "rows": per_group["path"].nunique(),
            "files": per_group["sha256"].nunique(),
            "original_groups": per_group["original"].nunique(),
            "new_classes": per_group["label"].nunique() - orig_classes,
            "class_share": share.groupby(level=0).max().round(6),
        }
    )
    table = table.rename_axis("group").reset_index()
    table = table.sort_values(["rows", "group"], ascending=[False, True], ignore_index=True)
    top = []
    for r in table.head(LARGEST_SHOWN).itertuples(index=False):
        members = sub[sub["group"] == r.group]
        top.append(
            {
                **{c: getattr(r, c) for c in cols},
                "classes": {str(k): int(v) for k, v in per_cell.loc[r.group].items()},
                "paths": sorted(members["path"].unique())[: MAX_EXAMPLES * 2],
            }
        )
    top = [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in e.items()} for e in top]
    return table[cols], top


def _near_duplicate_clusters(
    images: pd.DataFrame, near: NearDuplicates
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Near-duplicate clusters (two or more distinct files each), for the report and GX."""
    empty = pd.DataFrame({"cluster": pd.Series(dtype=str), "labels": pd.Series(dtype=int)})
    member = near.cluster >= 0
    if not member.any():
        return empty, []
    centre_path = images["path"].astype(str).to_numpy()[near.centre]
    groups = _members(pd.Series(near.cluster[member]), images[member])
    for cid, entry in groups.items():
        entry["centre"] = str(centre_path[cid])
    clusters = sorted(groups.values(), key=lambda c: c["paths"][0])
    for i, c in enumerate(clusters):
        c["cluster"] = f"near-{i + 1:05d}"
        c["conflicting_labels"] = len(c["labels"]) > 1
    table = pd.DataFrame(
        {
            "cluster": [c["cluster"] for c in clusters],
            "labels": [len(c["labels"]) for c in clusters],
        }
    )
    return table, clusters


def _cluster_rows(images: pd.DataFrame, clusters: list[dict[str, Any]]) -> pd.DataFrame:
    """Image rows of each near-duplicate cluster, keyed by the cluster id."""
    keys = {p: c["cluster"] for c in clusters for p in c["paths"]}
    rows = images[images["path"].isin(keys)]
    return rows.assign(key=rows["path"].map(keys))
