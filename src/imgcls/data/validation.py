"""The data contract: a great-expectations suite over the manifest, plus image-aware grouping.

This is the only module that imports great_expectations (lazily, inside functions, so that
importing :mod:`imgcls` stays fast). The suite is built in code from the `validate` params
section and run with an ephemeral context: no project folder, no Data Docs, no network.

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
the pixels, bounded clusters: no chaining), which reads the image files under ``root``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from imgcls.data.manifest import MANIFEST_COLUMNS
from imgcls.data.near_duplicates import NearDuplicates, find_near_duplicates
from imgcls.data.phash import PHASH_RE, same_value_pairs
from imgcls.errors import ImgclsError
from imgcls.task import LABEL_SEP, split_labels

if TYPE_CHECKING:
    from imgcls.config import ValidateConfig

_NOT_NULL_ALL = ("path", "label", "group", "sha256")  # required even for undecodable files
_NOT_NULL_IMAGES = ("width", "height", "mode", "format", "phash")  # required once decoded
_SOURCE_SPLITS = ("train", "val", "test")
_SHA256_RE = r"^[0-9a-f]{64}$"
# A multi-label cell: non-empty labels joined by "|" (ingest also sorts them and drops repeats).
_LABEL_SET_RE = r"^[^|]+(?:\|[^|]+)*$"
MAX_EXAMPLES = 10  # example paths per failed expectation (the "up to ten")
MAX_LISTED = 1000  # entries per report list; the counts are always complete
_KEYS = {
    "manifest": "path",
    "images": "path",
    "classes": "label",
    "labels": "path",
    "sha256": "sha256",
    "near_duplicates": "cluster",
    "merged_groups": "group",
}
LARGEST_SHOWN = 10  # largest merged groups listed (and drawn) in the reports


class DataContractError(ImgclsError):
    """The manifest cannot be validated at all (not a table, wrong types)."""


# --------------------------------------------------------------------------- result


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_manifest`."""

    ok: bool  # False = hard failure: the stage must exit non-zero
    valid: pd.DataFrame  # rows that passed; `group` merged for duplicates and near-duplicates
    report: dict[str, Any]  # JSON-able: expectations, quarantine, duplicates, clusters, counts
    markdown: str  # human report (also a GitHub job summary)
    failures: list[dict[str, Any]] = field(default_factory=list)  # failed critical expectations
    # verified near-duplicate pairs: path, twin, similarity, hamming, same_cluster
    near_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> str:
        """Readable failure summary: which expectation, how many rows, up to ten example paths."""
        counts = self.report.get("summary", {})
        if self.ok:
            return (
                f"validation passed: {counts.get('valid', 0)} of {counts.get('rows', 0)} rows "
                f"valid, {counts.get('quarantined', 0)} quarantined, "
                f"{counts.get('warnings', 0)} warning(s)"
            )
        lines = [
            f"validation failed: {len(self.failures)} expectation(s) not met "
            f"({counts.get('rows', 0)} manifest rows)"
        ]
        for item in self.failures:
            lines.append(f"  x {item['title']}")
            lines.append(f"    {item['expectation_type']} on {item['batch']}: {item['problem']}")
            lines.extend(f"      {ex}" for ex in item["examples"])
            if item["hint"]:
                lines.append(f"    fix: {item['hint']}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def validate_manifest(
    manifest: pd.DataFrame,
    cfg: ValidateConfig,
    *,
    multi_label: bool = False,
    root: Path | str = ".",
) -> ValidationResult:
    """Run the data contract on a manifest; never raises for bad data, reports it instead.

    `multi_label` (`data.multi_label`): each `label` cell is a set "cat|dog", and the class
    rules (`validate.classes`, `min_classes`, `min_images_per_class`, `max_imbalance_ratio`)
    count individual labels. `root`: the folder the manifest's paths are relative to (the
    near-duplicate check reads the images).
    """
    if not isinstance(manifest, pd.DataFrame):
        raise DataContractError(
            f"validate_manifest: expected a pandas DataFrame (read the manifest with "
            f"imgcls.io.read_csv), got {type(manifest).__name__}"
        )
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    frames = _frames(manifest, cfg, missing, multi_label, Path(root))
    checks = _build_checks(cfg, frames, missing)
    outcomes = _run_suite(frames, checks)
    failures = [o for o in outcomes if not o["success"] and o["severity"] == "critical"]
    report = _report(manifest, cfg, frames, outcomes)
    valid = frames.valid if not missing else manifest.iloc[0:0].copy()
    result = ValidationResult(
        ok=not failures,
        valid=valid,
        report=report,
        markdown="",
        failures=failures,
        near_pairs=frames.near_pairs,
    )
    result.markdown = render_markdown(report)
    return result


# --------------------------------------------------------------------------- derived frames


@dataclass
class _Frames:
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


def _frames(
    manifest: pd.DataFrame,
    cfg: ValidateConfig,
    missing: list[str],
    multi_label: bool = False,
    root: Path = Path("."),
) -> _Frames:
    """Build every frame the suite needs; with missing columns only the raw manifest."""
    table = _nullify(manifest.reset_index(drop=True))
    if missing:
        empty = pd.DataFrame()
        return _Frames({"manifest": table}, {}, empty, [], [], {}, [], multi_label)
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
    comp = _components(images, near)
    cluster_table, clusters = _near_duplicate_clusters(images, near)
    valid = manifest.reset_index(drop=True)[decoded].copy()
    valid["group"] = _merged_groups(images, comp)
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
    return _Frames(
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
        text = _str(label)
        if text and text not in entry["labels"]:
            entry["labels"].append(text)
    for entry in out.values():
        entry["paths"].sort()
        entry["labels"].sort()
    return out


def _components(images: pd.DataFrame, near: NearDuplicates) -> np.ndarray:
    """Connected components over rows: same original group, same sha256, or one near-dup cluster.

    A near-duplicate cluster contributes a star from its centre to its members, never the
    verified pairs themselves: those may chain, the clusters cannot.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(images)
    member = np.flatnonzero(near.cluster >= 0)
    edges = [np.stack([near.centre[near.cluster[member]], member], axis=1)]
    for col in ("group", "sha256"):
        codes = pd.factorize(images[col])[0]  # nulls get -1 and link to nothing
        known = np.flatnonzero(codes >= 0)
        if known.size:
            edges.append(known[same_value_pairs(codes[known])])
    e = np.concatenate(edges)
    if not e.size:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _merged_groups(images: pd.DataFrame, comp: np.ndarray) -> np.ndarray:
    """Group per row = the lexicographically smallest original group in its component."""
    groups = images["group"].fillna(images["path"]).astype(str).to_numpy()
    return pd.Series(groups).groupby(comp).transform("min").to_numpy()


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


# --------------------------------------------------------------------------- the suite


@dataclass(frozen=True)
class _Check:
    """One expectation, the frame it runs on, and words for people."""

    batch: str  # key of _Frames.tables
    expectation: Any  # a great_expectations Expectation
    title: str  # the rule in plain words
    hint: str  # how to fix a failure


def _build_checks(cfg: ValidateConfig, frames: _Frames, missing: list[str]) -> list[_Check]:
    """The suite, built from params: structure first, then images, classes and duplicates."""
    import great_expectations.expectations as gxe

    checks = [
        _Check(
            "manifest",
            gxe.ExpectColumnToExist(column=col),
            f"column `{col}` is present",
            "rebuild the manifest with `dvc repro ingest` (it writes every contract column)",
        )
        for col in MANIFEST_COLUMNS
    ]
    if missing:
        return checks  # every other rule needs these columns; more failures would be noise
    checks += [
        _Check(
            "manifest",
            gxe.ExpectColumnValuesToNotBeNull(column=col),
            f"`{col}` is filled in for every row",
            "rebuild the manifest with `dvc repro ingest`",
        )
        for col in _NOT_NULL_ALL
    ]
    checks += [
        _Check(
            "manifest",
            gxe.ExpectColumnValuesToBeUnique(column="path"),
            "each file is listed once",
            "rebuild the manifest; two sources may point at the same files",
        ),
        _Check(
            "manifest",
            gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=_SHA256_RE),
            "`sha256` is a 64-char lowercase hex digest",
            "rebuild the manifest with `dvc repro ingest`",
        ),
        _Check(
            "manifest",
            gxe.ExpectColumnValuesToBeInSet(column="source_split", value_set=list(_SOURCE_SPLITS)),
            "`source_split` is train, val, test or empty",
            "fix the source's split names or its `split:` setting under `data.source`",
        ),
        _Check(
            "manifest",
            # mostly = 1 - fraction: a few undecodable files are quarantined, more stop the run;
            # the tiny epsilon keeps an exact-threshold fraction on the passing side of float error
            gxe.ExpectColumnValuesToBeNull(
                column="error", mostly=max(0.0, 1.0 - cfg.max_quarantine_fraction - 1e-12)
            ),
            f"at most {cfg.max_quarantine_fraction:.2%} of the files are undecodable "
            "(those are quarantined)",
            "remove or replace the broken files listed, or raise "
            "`validate.max_quarantine_fraction` in params.yaml",
        ),
    ]
    checks += _image_checks(cfg, gxe, frames.multi_label)
    checks += _class_checks(cfg, gxe, frames.multi_label)
    checks += [
        _Check(
            "sha256",
            gxe.ExpectColumnValuesToBeBetween(column="labels", max_value=1),
            "byte-identical files carry the same label",
            "delete one copy of each pair listed, or move it to the right class",
        ),
        _Check(
            "images",
            gxe.ExpectColumnValuesToBeUnique(column="sha256", severity="warning"),
            "no byte-identical files (duplicates with one label are kept, in one group)",
            "nothing required: duplicates share a group, so they never straddle splits",
        ),
    ]
    if cfg.near_duplicate_threshold >= 0:
        checks.append(
            _Check(
                "near_duplicates",
                gxe.ExpectColumnValuesToBeBetween(column="labels", max_value=1, severity="warning"),
                f"near-duplicates (pHash distance <= {cfg.near_duplicate_threshold}, "
                f"thumbnail correlation >= {cfg.near_duplicate_similarity:g}) carry the same label",
                "look at the clusters listed: a mislabelled copy, or raise "
                "`validate.near_duplicate_similarity`",
            )
        )
    checks += [
        _Check(
            "merged_groups",
            gxe.ExpectColumnValuesToBeBetween(
                column="new_classes", max_value=0, severity="warning"
            ),
            "merging duplicates adds no class to a group (a merged group that spans classes is "
            "suspicious: a mislabelled copy, or different images taken for copies)",
            "look at the groups listed and at reports/validation_groups.png: fix the labels, or "
            "raise `validate.near_duplicate_similarity` if the images differ",
        ),
        _Check(
            "merged_groups",
            gxe.ExpectColumnValuesToBeBetween(
                column="class_share", max_value=cfg.max_merged_group_share, severity="warning"
            ),
            f"no merged group holds more than {cfg.max_merged_group_share:.0%} of a class "
            "(a large merged group moves that share of the class into one split)",
            "look at the groups listed: true copies are fine (delete spares to rebalance); "
            "otherwise raise `validate.near_duplicate_similarity` or use finer `data.group` rules",
        ),
    ]
    return checks


def _image_checks(cfg: ValidateConfig, gxe: Any, multi_label: bool = False) -> list[_Check]:
    """Checks on decoded images: filled-in properties, sizes, modes, labels."""
    checks = [
        _Check(
            "images",
            gxe.ExpectColumnValuesToNotBeNull(column=col),
            f"`{col}` is filled in for every decodable image",
            "rebuild the manifest with `dvc repro ingest`",
        )
        for col in _NOT_NULL_IMAGES
    ]
    checks += [
        _Check(
            "images",
            gxe.ExpectColumnValuesToBeBetween(
                column="width", min_value=cfg.min_width, max_value=cfg.max_width
            ),
            f"image width within [{cfg.min_width}, {cfg.max_width}] px",
            "remove or resize the images listed, or change `validate.min_width` / `max_width`",
        ),
        _Check(
            "images",
            gxe.ExpectColumnValuesToBeBetween(
                column="height", min_value=cfg.min_height, max_value=cfg.max_height
            ),
            f"image height within [{cfg.min_height}, {cfg.max_height}] px",
            "remove or resize the images listed, or change `validate.min_height` / `max_height`",
        ),
        _Check(
            "images",
            gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(cfg.allowed_modes)),
            f"colour mode in {', '.join(cfg.allowed_modes)}",
            "convert the images listed, or add their mode to `validate.allowed_modes`",
        ),
        _Check(
            "images",
            gxe.ExpectColumnValuesToMatchRegex(column="phash", regex=PHASH_RE),
            "`phash` is a 16-char lowercase hex 64-bit perceptual hash",
            "rebuild the manifest with `dvc repro ingest`",
        ),
    ]
    if multi_label:
        return checks + _label_set_checks(cfg, gxe)
    if cfg.classes:
        checks.append(
            _Check(
                "images",
                gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(cfg.classes)),
                f"labels within the configured classes ({', '.join(cfg.classes)})",
                "fix the folders / labels listed, or add the class to `validate.classes`",
            )
        )
    checks.append(
        _Check(
            "images",
            gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=cfg.min_classes),
            f"at least {cfg.min_classes} classes",
            "add images of more classes (one folder per class), or lower `validate.min_classes`",
        )
    )
    return checks


def _label_set_checks(cfg: ValidateConfig, gxe: Any) -> list[_Check]:
    """Multi-label: well-formed label sets; configured / minimum classes over single labels."""
    checks = [
        _Check(
            "images",
            gxe.ExpectColumnValuesToMatchRegex(column="label", regex=_LABEL_SET_RE),
            f"each label set is non-empty labels joined by '{LABEL_SEP}'",
            "rebuild the manifest with `dvc repro ingest` (it writes every set sorted and joined "
            f"by '{LABEL_SEP}'); in a labels CSV, set data.label_separator to the one you use",
        )
    ]
    if cfg.classes:
        checks.append(
            _Check(
                "labels",
                gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(cfg.classes)),
                f"every label within the configured classes ({', '.join(cfg.classes)})",
                "fix the labels listed in the labels CSV, or add them to `validate.classes`",
            )
        )
    checks.append(
        _Check(
            "labels",
            gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=cfg.min_classes),
            f"at least {cfg.min_classes} distinct labels",
            "add images with more labels, or lower `validate.min_classes`",
        )
    )
    return checks


def _class_checks(cfg: ValidateConfig, gxe: Any, multi_label: bool = False) -> list[_Check]:
    """Checks on per-class counts (per individual label for multi-label): size and imbalance."""
    if multi_label:
        noun, fix = "label", "add images carrying the labels listed"
        small = "add images carrying the rarest labels"
    else:
        noun, fix, small = (
            "class",
            "add images to the classes listed",
            "add images to the small classes",
        )
    return [
        _Check(
            "classes",
            gxe.ExpectColumnValuesToBeBetween(column="images", min_value=cfg.min_images_per_class),
            f"at least {cfg.min_images_per_class} images per {noun}",
            f"{fix}, or lower `validate.min_images_per_class`",
        ),
        _Check(
            "classes",
            gxe.ExpectColumnMaxToBeBetween(column="ratio", max_value=cfg.max_imbalance_ratio),
            f"{noun} imbalance (largest / smallest {noun}) at most {cfg.max_imbalance_ratio:g}",
            f"{small}, or raise `validate.max_imbalance_ratio`",
        ),
    ]


def _ephemeral_context() -> Any:
    """A GX context that lives in memory only: no files, no Data Docs, no progress bars."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # never phone home
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX pins this one logger to INFO at import ("Created temporary directory ..." on every
    # run); let it inherit from `great_expectations` again so the application decides.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.NOTSET)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _run_suite(frames: _Frames, checks: list[_Check]) -> list[dict[str, Any]]:
    """Validate each frame against its checks; one outcome dict per check, in order."""
    import great_expectations as gx

    context = _ephemeral_context()
    source = context.data_sources.add_pandas("imgcls")
    outcomes: list[dict[str, Any]] = []
    for batch_name in dict.fromkeys(c.batch for c in checks):
        mine = [c for c in checks if c.batch == batch_name]
        table = frames.tables[batch_name]
        suite = gx.ExpectationSuite(name=f"imgcls_{batch_name}")
        for check in mine:
            suite.add_expectation(check.expectation)
        asset = source.add_dataframe_asset(batch_name)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": table}
        )
        result = batch.validate(suite, result_format=_result_format(batch_name, table.columns))
        for check, res in zip(mine, _ordered(result.results, mine), strict=True):
            outcomes.append(_outcome(check, res.to_json_dict(), frames, len(table)))
    return outcomes


def _ordered(results: list[Any], checks: list[_Check]) -> list[Any]:
    """Results in the order of `checks`: GX reorders them, and unsaved suites carry no ids."""
    by_key = {_config_key(r.expectation_config.to_json_dict()): r for r in results}
    return [by_key[_config_key(c.expectation.configuration.to_json_dict())] for c in checks]


def _config_key(config: dict[str, Any]) -> str:
    """Identity of an expectation within one suite: type, arguments (minus batch) and severity."""
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    return json.dumps([config["type"], kwargs, str(config.get("severity"))], sort_keys=True)


def _result_format(batch_name: str, columns: pd.Index) -> dict[str, Any]:
    """Row frames: a few example rows by path; small derived frames: every unexpected key."""
    key = _KEYS[batch_name]
    if key not in columns:
        return {"result_format": "SUMMARY"}  # only column-presence checks run then
    if key == "path":
        return {
            "result_format": "SUMMARY",
            "unexpected_index_column_names": [key],
            "partial_unexpected_count": MAX_EXAMPLES,
        }
    return {"result_format": "COMPLETE", "unexpected_index_column_names": [key]}


def _outcome(check: _Check, res: dict[str, Any], frames: _Frames, n: int) -> dict[str, Any]:
    """One JSON-able record per expectation: config, observed value, success, examples."""
    config = res["expectation_config"]
    kwargs = _plain({k: v for k, v in config["kwargs"].items() if k != "batch_id"})
    result = res.get("result") or {}
    exc = res.get("exception_info") or {}
    key = _KEYS[check.batch]
    index = result.get("unexpected_index_list") or result.get("partial_unexpected_index_list") or []
    keys = [row.get(key) for row in index if isinstance(row, dict)]
    out = {
        "batch": check.batch,
        "expectation_type": config["type"],
        "kwargs": kwargs,
        "severity": str(config.get("severity") or "critical"),
        "success": bool(res["success"]),
        "title": check.title,
        "hint": "" if res["success"] else check.hint,
        "observed_value": _plain(result.get("observed_value")),
        "element_count": result.get("element_count", n),
        "unexpected_count": result.get("unexpected_count"),
        "unexpected_percent": result.get("unexpected_percent"),
        "unexpected_values": _plain(_unexpected_values(result, key)),
        "exception": exc.get("exception_message") if exc.get("raised_exception") else None,
    }
    out["examples"] = [] if res["success"] else _examples(check, kwargs, index, keys, frames)
    out["problem"] = "" if res["success"] else _problem(check, out, keys, frames)
    return out


def _plain(value: Any) -> Any:
    """Numpy scalars (GX passes some through) as plain Python values, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _unexpected_values(result: dict[str, Any], key: str) -> list[Any]:
    """The offending keys of a derived frame (classes, digests, clusters); empty for rows."""
    if key == "path":
        return []
    index = result.get("unexpected_index_list") or []
    return [row.get(key) for row in index if isinstance(row, dict)][:MAX_LISTED]


def _examples(
    check: _Check, kwargs: dict[str, Any], index: list[Any], keys: list[Any], frames: _Frames
) -> list[str]:
    """Up to ten example paths (with the offending value) for a failed expectation."""
    column = kwargs.get("column")
    if _KEYS[check.batch] == "path":
        out = []
        for row in index[:MAX_EXAMPLES]:
            value = row.get(column) if isinstance(row, dict) else None
            shown = "missing" if value is None else repr(value)
            if value is None and column in ("width", "height"):
                shown = "missing or not a number"  # coerced to a number before GX sees it
            out.append(f"{row.get('path')} ({column}={shown})")
        return out
    rows = frames.rows.get(check.batch)
    if rows is None or not keys:
        return []
    hit = rows[rows["key"].isin(keys)].sort_values(["key", "path"])
    if check.batch == "classes":
        # one example per failing class in turn, so every class listed shows up
        hit = hit.assign(_turn=hit.groupby("key").cumcount()).sort_values(["_turn", "key"])
    return [
        f"{r.path} (label={r.label!r}{_key_note(check.batch, r.key)})"
        for r in hit.head(MAX_EXAMPLES).itertuples()
    ]


def _key_note(batch: str, key: str) -> str:
    """Extra words naming the derived key an example path belongs to."""
    if batch == "sha256":
        return f", sha256={key[:12]}…"
    if batch == "near_duplicates":
        return f", cluster={key}"
    if batch == "merged_groups":
        return f", group={key}"
    return ""


def _problem(check: _Check, out: dict[str, Any], keys: list[Any], frames: _Frames) -> str:
    """One line saying what was observed, and how many rows it concerns."""
    if out["exception"]:
        return f"could not be evaluated: {out['exception']}"
    if out["expectation_type"] == "expect_column_to_exist":
        present = ", ".join(map(str, frames.tables[check.batch].columns)) or "none"
        return f"no column `{out['kwargs']['column']}` (columns present: {present})"
    kind = _KEYS[check.batch]
    if out["unexpected_count"] is not None and kind == "path":
        text = (
            f"{out['unexpected_count']} of {out['element_count']} rows "
            f"({out['unexpected_percent'] or 0:.2f}%)"
        )
        mostly = out["kwargs"].get("mostly")
        if mostly is not None and mostly < 1:
            text += f", at most {(1 - mostly) * 100:.2f}% allowed"
        return text
    if out["unexpected_count"] is not None:
        rows = frames.rows[check.batch]
        n_rows = int(rows["key"].isin(keys).sum())
        if check.batch == "classes":
            shown = ", ".join(f"{k} ({frames.class_counts.get(str(k), 0)})" for k in keys)
        else:
            shown = ", ".join(map(str, keys[:MAX_EXAMPLES]))
        noun = {
            "classes": "classes",
            "sha256": "duplicate sets",
            "near_duplicates": "clusters",
            "merged_groups": "merged groups",
        }
        return (
            f"{out['unexpected_count']} of {out['element_count']} {noun[check.batch]} "
            f"({n_rows} rows): {shown}"
        )
    if out["observed_value"] is not None:
        text = f"observed {out['observed_value']!r}, expected {_bounds(out['kwargs'])}"
        return text + _extremes(frames.class_counts) if check.batch == "classes" else text
    if check.batch == "classes":
        return "no decodable images to count"
    return "not met"


def _extremes(counts: dict[str, int]) -> str:
    """Words naming the largest and smallest non-empty class."""
    present = {k: v for k, v in counts.items() if v > 0}
    if not present:
        return ""
    big = max(present, key=lambda k: (present[k], k))
    small = min(present, key=lambda k: (present[k], k))
    return f" (largest {big!r}: {present[big]}, smallest {small!r}: {present[small]})"


def _bounds(kwargs: dict[str, Any]) -> str:
    """Render min/max bounds of an expectation as words."""
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and hi is not None:
        return f"between {lo:g} and {hi:g}"
    if lo is not None:
        return f"at least {lo:g}"
    if hi is not None:
        return f"at most {hi:g}"
    return "a value"


# --------------------------------------------------------------------------- report


def _report(
    manifest: pd.DataFrame, cfg: ValidateConfig, frames: _Frames, outcomes: list[dict[str, Any]]
) -> dict[str, Any]:
    """The machine-readable report: counts, every expectation, quarantine and duplicate lists."""
    import great_expectations as gx

    table = frames.tables["manifest"]
    quarantine = _quarantine(table) if {"path", "label", "error"} <= set(table.columns) else []
    failed = [o for o in outcomes if not o["success"] and o["severity"] == "critical"]
    warned = [o for o in outcomes if not o["success"] and o["severity"] != "critical"]
    n = len(manifest)
    valid_groups = frames.valid["group"].nunique() if len(frames.valid) else 0
    images = frames.tables.get("images")
    dup_rows = sum(len(d["paths"]) for d in frames.duplicates)
    near = frames.near
    merged_table = frames.tables.get("merged_groups", pd.DataFrame())
    summary = {
        "rows": n,
        "valid": len(frames.valid),
        "quarantined": len(quarantine),
        "quarantine_fraction": round(len(quarantine) / n, 6) if n else 0.0,
        "max_quarantine_fraction": cfg.max_quarantine_fraction,
        "classes": len(frames.found_labels),
        "exact_duplicate_sets": len(frames.duplicates),
        "exact_duplicate_rows": dup_rows,
        "conflicting_duplicate_sets": sum(d["conflicting_labels"] for d in frames.duplicates),
        "near_duplicate_clusters": len(frames.clusters),
        "near_duplicate_rows": sum(len(c["paths"]) for c in frames.clusters),
        "near_duplicate_candidates": near.candidates if near else 0,
        "near_duplicate_verified_pairs": len(near.pairs) if near else 0,
        "near_duplicate_unverifiable_pairs": near.unverifiable if near else 0,
        "near_duplicate_pairs_across_clusters": near.cut if near else 0,
        "merged_groups": len(merged_table),
        "merged_group_rows": int(merged_table["rows"].sum()) if len(merged_table) else 0,
        "largest_merged_group": int(merged_table["rows"].max()) if len(merged_table) else 0,
        "groups_before": int(images["group"].nunique()) if images is not None else 0,
        "groups_after": int(valid_groups),
        "expectations": len(outcomes),
        "failed_expectations": len(failed),
        "warnings": len(warned),
    }
    labels: dict[str, Any] = {
        "configured": list(cfg.classes) if cfg.classes else None,
        "found": frames.found_labels,
        "counts": frames.class_counts,  # images per class; per individual label if multi-label
    }
    if frames.multi_label:
        summary["label_combinations"] = len(frames.combinations)
        labels["multi_label"] = True
        labels["combinations"] = dict(list(frames.combinations.items())[:MAX_LISTED])
        labels["combinations_truncated"] = max(0, len(frames.combinations) - MAX_LISTED)
    return {
        "success": not failed,
        "summary": summary,
        "params": cfg.model_dump(mode="json"),
        "labels": labels,
        "expectations": outcomes,
        "quarantine": quarantine[:MAX_LISTED],
        "duplicates": frames.duplicates[:MAX_LISTED],
        "near_duplicates": frames.clusters[:MAX_LISTED],
        "largest_merged_groups": frames.merged[:LARGEST_SHOWN],
        "truncated": {
            "quarantine": max(0, len(quarantine) - MAX_LISTED),
            "duplicates": max(0, len(frames.duplicates) - MAX_LISTED),
            "near_duplicates": max(0, len(frames.clusters) - MAX_LISTED),
        },
        "great_expectations_version": gx.__version__,
    }


def _quarantine(table: pd.DataFrame) -> list[dict[str, str]]:
    """Rows with an `error`, sorted by path: what is left out of the valid rows, and why."""
    bad = table[table["error"].notna()].sort_values("path")
    return [
        {"path": _str(path), "label": _str(label), "reason": str(reason)}
        for path, label, reason in zip(bad["path"], bad["label"], bad["error"], strict=True)
    ]


def _str(value: Any) -> str:
    """A cell as text; nulls become the empty string."""
    return (
        ""
        if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))
        else str(value)
    )


def _cell(value: Any) -> str:
    """Escape a value for a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any], max_rows: int = 50, figure: str | None = None) -> str:
    """The human report: verdict, counts, expectations, classes, quarantine and duplicates.

    `figure`: file name (beside the report) of the thumbnail strips of the largest merged groups.
    """
    s = report["summary"]
    verdict = "PASSED" if report["success"] else "FAILED"
    multi = bool(report["labels"].get("multi_label"))
    classes = (
        f"{s['classes']} labels in {s['label_combinations']} combinations"
        if multi
        else f"{s['classes']} classes"
    )
    lines = [
        f"# Data validation: {verdict}",
        "",
        f"{s['rows']} files in the manifest, {s['valid']} valid, {s['quarantined']} quarantined "
        f"({s['quarantine_fraction']:.2%}; at most {s['max_quarantine_fraction']:.2%} allowed), "
        f"{classes}, {s['groups_after']} groups after merging duplicates "
        f"({s['groups_before']} before).",
        "",
        "## Expectations",
        "",
        "| result | severity | on | rule | expectation | observed |",
        "|---|---|---|---|---|---|",
    ]
    for o in report["expectations"]:
        mark = "pass" if o["success"] else ("**FAIL**" if o["severity"] == "critical" else "warn")
        lines.append(
            f"| {mark} | {o['severity']} | {o['batch']} | {_cell(o['title'])} | "
            f"`{o['expectation_type']}` | {_cell(_observed(o))} |"
        )
    problems = [o for o in report["expectations"] if not o["success"]]
    if problems:
        lines += ["", "## Problems", ""]
        for o in problems:
            lines.append(f"- **{_cell(o['title'])}** ({o['severity']}): {_cell(o['problem'])}")
            lines += [f"  - `{_cell(ex)}`" for ex in o["examples"]]
            if o["hint"]:
                lines.append(f"  - fix: {_cell(o['hint'])}")
    counts = report["labels"]["counts"]
    if counts and multi:
        lines += ["", "## Labels (images carrying each label)", "", "| label | images |"]
        lines += ["|---|---|", *(f"| {_cell(k)} | {v} |" for k, v in counts.items())]
    elif counts:
        lines += ["", "## Classes", "", "| class | images |", "|---|---|"]
        lines += [f"| {_cell(k)} | {v} |" for k, v in counts.items()]
    if multi:
        combos = report["labels"]["combinations"]
        lines += _listing(
            "Label combinations",
            s["label_combinations"],
            ["labels", "images"],
            [[k, str(v)] for k, v in combos.items()],
            max_rows,
        )
    lines += _listing(
        "Quarantined files",
        s["quarantined"],
        ["path", "label", "reason"],
        [[q["path"], q["label"], q["reason"]] for q in report["quarantine"]],
        max_rows,
    )
    lines += _listing(
        "Exact duplicates (same bytes)",
        s["exact_duplicate_sets"],
        ["sha256", "labels", "paths"],
        [
            [d["sha256"][:12] + "…", ", ".join(d["labels"]), "<br>".join(d["paths"])]
            for d in report["duplicates"]
        ],
        max_rows,
    )
    lines += _merged_section(report, figure)
    lines += _listing(
        "Near-duplicate clusters (same group, never split apart)",
        s["near_duplicate_clusters"],
        ["cluster", "labels", "paths"],
        [
            [c["cluster"], ", ".join(c["labels"]), "<br>".join(c["paths"][:20])]
            for c in report["near_duplicates"]
        ],
        max_rows,
    )
    return "\n".join(lines) + "\n"


def _merged_section(report: dict[str, Any], figure: str | None) -> list[str]:
    """Largest merged groups: size, classes, share of a class, and the thumbnail strips."""
    s = report["summary"]
    merged = report.get("largest_merged_groups") or []
    if not merged:
        return []
    lines = [
        "",
        f"## Largest merged groups ({s['merged_groups']} groups, {s['merged_group_rows']} rows)",
        "",
        "Groups that exact or near-duplicate files joined together; each stays in one split. "
        f"{s['near_duplicate_verified_pairs']} of {s['near_duplicate_candidates']} pHash "
        "candidate pairs were verified on the pixels"
        + (
            f"; {s['near_duplicate_pairs_across_clusters']} verified pairs lie in different "
            "groups (clusters have a bounded radius, so chains are cut)."
            if s["near_duplicate_pairs_across_clusters"]
            else "."
        ),
        "",
        "| # | group | rows | classes | largest share of a class | note |",
        "|---|---|---|---|---|---|",
    ]
    for i, m in enumerate(merged, 1):
        classes = ", ".join(f"{k} ({v})" for k, v in m["classes"].items())
        note = "**spans classes: suspicious**" if m["new_classes"] > 0 else ""
        lines.append(
            f"| {i} | {_cell(m['group'])} | {m['rows']} | {_cell(classes)} | "
            f"{m['class_share']:.2%} | {note} |"
        )
    if figure:
        lines += ["", f"![thumbnails of the largest merged groups, one row each]({figure})"]
    return lines


def merged_group_strips(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(caption, paths) per largest merged group, for the thumbnail sheet."""
    return [
        (
            f"#{i} {m['group']}: {m['rows']} rows, "
            + ", ".join(f"{k} {v}" for k, v in m["classes"].items()),
            m["paths"],
        )
        for i, m in enumerate(report.get("largest_merged_groups") or [], 1)
    ]


def _observed(o: dict[str, Any]) -> str:
    """Short observed value for the expectations table."""
    if o["exception"]:
        return "error: " + o["exception"]
    if o["unexpected_count"] is not None:
        return f"{o['unexpected_count']} of {o['element_count']} unexpected"
    if o["observed_value"] is not None:
        value = o["observed_value"]
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    return "present" if o["success"] else "missing"


def _listing(
    title: str, total: int, header: list[str], rows: list[list[str]], max_rows: int
) -> list[str]:
    """A titled Markdown table with at most `max_rows` rows and a note when cut."""
    if not total:
        return []
    lines = ["", f"## {title} ({total})", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows[:max_rows]]
    if total > max_rows:
        lines.append(f"\n…and {total - max_rows} more (see the JSON report).")
    return lines
