"""The machine-readable split report: counts, shares vs targets, leakage checks, exclusions."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from imgcls.config import SplitConfig
from imgcls.data.split.common import (
    EXCLUDED_ATTR,
    EXCLUDED_COLUMNS,
    REQUIRED,
    SPLITS,
    WARNINGS_ATTR,
    check_frame,
    check_label_sets,
    column,
    fractions,
    merged_components,
)
from imgcls.data.split.strata import multi_label_strata, stratum_min_groups
from imgcls.task import join_labels, split_labels

log = logging.getLogger("imgcls.split")  # one logger for the whole split
DEVIATION_WARN_PP = 2.0  # the quality target: per-class share within 2 pp of target
_MAX_EXAMPLES = 5
MAX_REPORTED_COMBINATIONS = 1000  # combination x split rows in reports/split.json
MAX_REPORTED_EXCLUDED = 1000  # excluded rows listed in reports/split.json (the count is complete)


def _target_shares(counts: pd.DataFrame, cfg: SplitConfig, use_source: bool) -> pd.DataFrame:
    """Per-class target share per split; with a source test set its share is taken as given."""
    frac = pd.Series(fractions(cfg), index=list(SPLITS))
    totals = counts.sum(axis=1).replace(0, np.nan)
    target = pd.DataFrame({s: frac[s] for s in SPLITS}, index=counts.index)
    if use_source:
        test_share = counts["test"] / totals
        tv = frac["train"] + frac["val"]
        for s in ("train", "val"):
            target[s] = (frac[s] / tv if tv else 0.0) * (1 - test_share)
        target["test"] = test_share
    return target.fillna(0.0)


def _label_view(splits: pd.DataFrame, multi_label: bool) -> pd.DataFrame:
    """The rows class statistics count: as given, or one per (row, label) for label sets."""
    if not multi_label:
        return splits
    parts = column(splits, "label").map(split_labels)
    return splits.assign(label=parts).explode("label").reset_index(drop=True)


def _split_rows(splits: pd.DataFrame) -> pd.Series:
    """Rows per split (SPLITS order)."""
    return column(splits, "split").value_counts().reindex(list(SPLITS), fill_value=0).astype(int)


def _counts(splits: pd.DataFrame) -> pd.DataFrame:
    """Rows per class (index) x split (columns, in SPLITS order)."""
    table = pd.crosstab(column(splits, "label"), column(splits, "split"))
    return table.reindex(columns=list(SPLITS), fill_value=0).astype(int)


def _deviation(counts: pd.DataFrame, target: pd.DataFrame) -> tuple[float, str, str]:
    """Worst |actual - target| per-class share in percentage points, with its class and split."""
    totals = counts.sum(axis=1).replace(0, np.nan)
    dev = (counts.div(totals, axis=0) - target).abs().fillna(0.0) * 100
    if dev.empty:
        return 0.0, "", ""
    stacked = dev.stack()
    label, split = stacked.idxmax()
    return float(stacked.max()), str(label), str(split)


def _uses_source(splits: pd.DataFrame, cfg: SplitConfig) -> bool:
    """Whether the source's own test set fixed the test split."""
    return bool(cfg.respect_source_split and (column(splits, "source_split") == "test").any())


def coverage_warnings(
    splits: pd.DataFrame, cfg: SplitConfig, multi_label: bool = False
) -> list[str]:
    """Classes (labels) missing from a non-empty split (say where they went), large deviations."""
    noun = "label" if multi_label else "class"
    splits = _label_view(splits, multi_label)
    counts = _counts(splits)
    present = [s for s in SPLITS if counts[s].sum() > 0]
    grp = column(splits, "group")
    lab = column(splits, "label")
    notes = []
    for label, row in counts.iterrows():
        missing = [s for s in present if row[s] == 0]
        if not missing:
            continue
        groups = grp[lab == label].unique()
        went = ", ".join(f"{s}: {int(row[s])}" for s in SPLITS if row[s] > 0)
        if len(groups) == 1:
            notes.append(
                f"{noun} '{label}' lives in one group ('{groups[0]}', {int(row.sum())} image(s)) "
                f"so it cannot appear in every split; it went to {went} and is missing from "
                f"{', '.join(missing)}"
            )
        else:
            notes.append(
                f"{noun} '{label}' ({len(groups)} groups) is missing from {', '.join(missing)}; "
                f"its images went to {went}"
            )
    worst, label, split = _deviation(counts, _target_shares(counts, cfg, _uses_source(splits, cfg)))
    if worst > DEVIATION_WARN_PP:
        notes.append(
            f"worst per-{noun} share deviation is {worst:.1f} pp ({noun} '{label}' in {split}), "
            f"above {DEVIATION_WARN_PP:g} pp: groups are large relative to that {noun} (finer "
            "groups or more data help; stable: true also keeps an old imbalance)"
        )
    return notes


def near_duplicate_pairs(
    splits: pd.DataFrame, near_pairs: pd.DataFrame
) -> list[tuple[str, str, float]]:
    """Verified near-duplicate pairs (validate's) whose two files sit in different splits."""
    if not len(near_pairs) or "path" not in splits.columns:
        return []
    where = pd.Series(column(splits, "split").to_numpy(), index=column(splits, "path"))
    where = where[~where.index.duplicated()]
    sa = where.reindex(near_pairs["path"].astype(str)).to_numpy()
    sb = where.reindex(near_pairs["twin"].astype(str)).to_numpy()
    cross = pd.notna(sa) & pd.notna(sb) & (sa != sb)
    hit = near_pairs[cross]
    return [
        (str(a), str(b), float(s))
        for a, b, s in zip(hit["path"], hit["twin"], hit["similarity"], strict=True)
    ]


def _shared(splits: pd.DataFrame, key: str) -> list[str]:
    """Values of column `key` that occur in more than one split."""
    if key not in splits.columns:
        return []
    values = column(splits, key)
    keep = values != ""
    n = pd.DataFrame({"k": values[keep], "s": column(splits, "split")[keep]})
    per = n.drop_duplicates().groupby("k").size()
    return sorted(per[per > 1].index.tolist())


def split_report(
    splits: pd.DataFrame,
    cfg: SplitConfig,
    near_pairs: pd.DataFrame | None = None,
    *,
    multi_label: bool = False,
) -> dict[str, Any]:
    """JSON-able summary: class x split counts, groups, target vs actual shares, leakage checks.

    `near_pairs`: validate's verified near-duplicate pairs; None = that check is skipped.
    `multi_label`: `counts`, `class_shares` and the deviations are per individual label (a row
    counts once for each of its labels); `label_combinations` and `strata` are added. Rows that
    `assign_splits` excluded (`.attrs[EXCLUDED_ATTR]`) are listed under `excluded`.
    """
    check_frame(splits, "splits", (*REQUIRED, "split"), "pass what assign_splits returned")
    if multi_label:
        check_label_sets(splits, "splits")
    counts = _counts(_label_view(splits, multi_label))
    use_source = _uses_source(splits, cfg)
    target = _target_shares(counts, cfg, use_source)
    worst, w_label, w_split = _deviation(counts, target)
    params_target = _target_shares(counts, cfg, use_source=False)
    worst_params, _, _ = _deviation(counts, params_target)
    totals = _split_rows(splits)
    n = int(totals.sum())
    groups = column(splits, "group")
    split_col = column(splits, "split")
    frac = dict(zip(SPLITS, fractions(cfg).tolist(), strict=True))

    shared_groups = _shared(splits, "group")
    shared_sha = _shared(splits, "sha256")
    near_checked = near_pairs is not None
    near = near_duplicate_pairs(splits, near_pairs) if near_pairs is not None else []

    process = list(splits.attrs.get(WARNINGS_ATTR, []))
    derived = coverage_warnings(splits, cfg, multi_label)
    for w in derived:
        if w not in process:  # assign_splits already logged its own copy
            log.warning("%s", w)
    if not near_checked:
        msg = "near-duplicate check skipped (no verified near-duplicate pairs were given)"
        log.warning("%s", msg)
        derived.append(msg)
    warnings = process + [w for w in derived if w not in process]

    report: dict[str, Any] = {
        "rows": n,
        "groups": int(groups.nunique()),
        "classes": len(counts),
        "params": {**frac, "stable": cfg.stable, "respect_source_split": cfg.respect_source_split},
        "target_basis": "source_test_fixed" if use_source else "params",
        "splits": {
            s: {
                "rows": int(totals[s]),
                "groups": int(groups[split_col == s].nunique()),
                "share": round(float(totals[s]) / n, 6) if n else 0.0,
                "target_share": frac[s],
            }
            for s in SPLITS
        },
        "groups_per_split": {s: int(groups[split_col == s].nunique()) for s in SPLITS},
        "counts": {
            str(label): {s: int(row[s]) for s in SPLITS} for label, row in counts.iterrows()
        },
        "class_shares": {
            str(label): {
                s: {
                    "actual": round(float(row[s]) / max(int(row.sum()), 1), 6),
                    "target": round(float(target.loc[label, s]), 6),
                }
                for s in SPLITS
            }
            for label, row in counts.iterrows()
        },
        "worst_deviation_pp": round(worst, 3),
        "worst_deviation_at": {"label": w_label, "split": w_split},
        "worst_deviation_vs_params_pp": round(worst_params, 3),
        # class x split cells left empty although that split holds other classes
        "missing_class_splits": int(((counts == 0) & (totals > 0)).to_numpy().sum()),
        "leakage": {
            "no_shared_group": not shared_groups,
            "no_shared_sha256": not shared_sha,
            "no_near_duplicate": (not near) if near_checked else None,
            "shared_groups": len(shared_groups),
            "shared_sha256": len(shared_sha),
            "near_duplicate_pairs": len(near),
            "examples": {
                "groups": shared_groups[:_MAX_EXAMPLES],
                "sha256": shared_sha[:_MAX_EXAMPLES],
                "near_duplicates": [list(p) for p in near[:_MAX_EXAMPLES]],
            },
        },
        "warning_count": len(warnings),
        "warnings": warnings,
        "excluded": _excluded_report(splits.attrs.get(EXCLUDED_ATTR)),
    }
    if multi_label:
        report.update(_multi_label_report(splits, cfg))
    return report


def _excluded_report(excluded: pd.DataFrame | None) -> dict[str, Any]:
    """Rows kept out of every split because they would leak into the delivered test set."""
    if excluded is None or not len(excluded):
        return {"rows": 0, "by_reason": {}, "by_label": {}, "rows_listed": []}
    table = excluded.sort_values(["reason", "path"])
    listed = [
        {
            k: (None if isinstance(v, float) and np.isnan(v) else v)
            for k, v in zip(EXCLUDED_COLUMNS, row, strict=True)
        }
        for row in table[list(EXCLUDED_COLUMNS)].head(MAX_REPORTED_EXCLUDED).itertuples(index=False)
    ]
    return {
        "rows": len(excluded),
        "by_reason": {str(k): int(v) for k, v in excluded["reason"].value_counts().items()},
        "by_label": {str(k): int(v) for k, v in excluded["label"].value_counts().items()},
        "rows_listed": listed,
    }


def _multi_label_report(splits: pd.DataFrame, cfg: SplitConfig) -> dict[str, Any]:
    """Multi-label extras: rows per label combination x split, and how combinations were pooled."""
    combos = column(splits, "label").map(lambda x: join_labels(split_labels(x)))
    table = pd.crosstab(combos, column(splits, "split"))
    table = table.reindex(columns=list(SPLITS), fill_value=0).astype(int)
    table = table.loc[sorted(table.index, key=lambda c: (-int(table.loc[c].sum()), c))]
    comp = merged_components(splits)[0]
    strata = multi_label_strata(column(splits, "label"), comp, stratum_min_groups(fractions(cfg)))
    return {
        "multi_label": True,
        "label_combinations": {
            str(c): {s: int(row[s]) for s in SPLITS}
            for c, row in table.head(MAX_REPORTED_COMBINATIONS).iterrows()
        },
        "label_combinations_truncated": max(0, len(table) - MAX_REPORTED_COMBINATIONS),
        "strata": {
            "min_groups": strata.min_groups,
            "combinations": len(strata.groups),
            "stratified": sum(st.startswith("combination:") for st in strata.stratum.values()),
            "pooled_by_rarest_label": strata.pooled,
        },
    }
