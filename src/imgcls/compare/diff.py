"""The comparison itself: headline and per-class deltas, changed predictions, params, B − A."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgcls.compare.runs import CompareError, RunData
from imgcls.task import safe_name

HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "subset_accuracy", "f1_micro")
STEMS = ("precision", "recall", "f1")


@dataclass
class Comparison:
    """A vs B: headline and per-class deltas, confusion difference, changed images, params."""

    a: RunData
    b: RunData
    headline: pd.DataFrame  # metric, a, b, delta
    per_class: pd.DataFrame  # class, support, <stem>_a, <stem>_b, <stem>_delta; largest first
    changed: pd.DataFrame  # path, label, predicted_a, predicted_b, confidence_a/_b, change
    params: pd.DataFrame  # param, a, b
    same_test_set: str  # how comparability was established (or "forced: ...")
    out_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    not_logged: list[str] = field(default_factory=list)

    @property
    def diff(self) -> np.ndarray | None:
        """B's confusion counts minus A's (rows: true class), None when not comparable."""
        return confusion_difference(self.a.confusion, self.b.confusion)

    @property
    def fixed(self) -> pd.DataFrame:
        """Test images A got wrong and B right."""
        return self.changed[self.changed["change"] == "fixed"]

    @property
    def broken(self) -> pd.DataFrame:
        """Test images A got right and B wrong."""
        return self.changed[self.changed["change"] == "broken"]


def check_test_set(a: RunData, b: RunData, force: bool = False) -> str:
    """How A and B are known to share their test set; a :class:`CompareError` if they do not."""
    digest_a, digest_b = a.tags.get("data.splits_sha256"), b.tags.get("data.splits_sha256")
    if digest_a and digest_a == digest_b:
        return f"same splits.csv (sha256 {digest_a[:12]}), {len(a.predictions)} test images"
    rows_a = set(zip(a.predictions["path"], a.predictions["label"], strict=True))
    rows_b = set(zip(b.predictions["path"], b.predictions["label"], strict=True))
    if rows_a == rows_b:
        return f"same {len(rows_a)} test images (splits.csv differs outside the test split)"
    problem = (
        f"{a.ref} and {b.ref} were not tested on the same images: {len(rows_a)} vs {len(rows_b)} "
        f"test rows, {len(rows_a & rows_b)} in common (splits.csv sha256 {str(digest_a)[:12]} vs "
        f"{str(digest_b)[:12]}); their metrics do not compare"
    )
    if a.classes != b.classes:
        problem += f"; classes differ ({a.classes[:5]}... vs {b.classes[:5]}...)"
    if not force:
        raise CompareError(problem + ". Pass --force to compare the common images anyway")
    return f"forced: {problem}"


def headline_table(a: RunData, b: RunData) -> pd.DataFrame:
    """The headline test metrics both runs have: metric, a, b, delta."""
    rows = [
        (k, float(a.details[k]), float(b.details[k]))
        for k in HEADLINE
        if k in a.details and k in b.details
    ]
    frame = pd.DataFrame(rows, columns=["metric", "a", "b"])
    return frame.assign(delta=frame["b"] - frame["a"])


def per_class_table(a: RunData, b: RunData) -> pd.DataFrame:
    """Per-class test precision / recall / F1 of A and B and their deltas, largest change first.

    Sorted by the absolute change of F1, then by the largest of the three, then by name;
    classes only one run knows get NaN for the other (and come first).
    """
    classes = list(dict.fromkeys([*a.classes, *b.classes]))
    rows = []
    for name in classes:
        key = safe_name(name)
        row: dict[str, Any] = {"class": name, "support": b.details.get(f"support_{key}", np.nan)}
        for stem in STEMS:
            va = a.details.get(f"{stem}_{key}", np.nan)
            vb = b.details.get(f"{stem}_{key}", np.nan)
            row.update({f"{stem}_a": va, f"{stem}_b": vb, f"{stem}_delta": vb - va})
        rows.append(row)
    frame = pd.DataFrame(rows)
    f1 = frame["f1_delta"].abs().fillna(np.inf)  # a class only one run knows: first
    most = frame[[f"{s}_delta" for s in STEMS]].abs().max(axis=1).fillna(np.inf)
    order = sorted(
        range(len(frame)), key=lambda i: (-f1.iloc[i], -most.iloc[i], str(frame["class"][i]))
    )
    return frame.iloc[order].reset_index(drop=True)


def changed_predictions(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Test images (common to both) whose prediction changed, each marked fixed / broken / other.

    fixed: A wrong, B right; broken: A right, B wrong; other: both wrong, differently.
    """
    both = a.merge(b, on=["path", "label"], suffixes=("_a", "_b"))
    moved = both[both["predicted_a"] != both["predicted_b"]].copy()
    ok_a = moved["predicted_a"] == moved["label"]
    ok_b = moved["predicted_b"] == moved["label"]
    moved["change"] = np.where(~ok_a & ok_b, "fixed", np.where(ok_a & ~ok_b, "broken", "other"))
    cols = ["path", "label", "predicted_a", "predicted_b", "confidence_a", "confidence_b"]
    # Most confident new decision first: the changes the model is surest about.
    return (
        moved[[*cols, "change"]]
        .sort_values(["change", "confidence_b"], ascending=[True, False], kind="stable")
        .reset_index(drop=True)
    )


def params_table(a: RunData, b: RunData) -> pd.DataFrame:
    """The params whose values differ (missing in one run shown as empty)."""
    keys = sorted(set(a.params) | set(b.params))
    rows = [(k, a.params.get(k, ""), b.params.get(k, "")) for k in keys]
    return pd.DataFrame([r for r in rows if r[1] != r[2]], columns=["param", "a", "b"])


def confusion_difference(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """B − A counts, or None when either is missing or their shapes differ."""
    if a is None or b is None or a.shape != b.shape:
        return None
    return b.astype(np.int64) - a.astype(np.int64)


def compare(a: RunData, b: RunData, force: bool = False) -> Comparison:
    """The comparison of two loaded runs (nothing written)."""
    same = check_test_set(a, b, force)
    return Comparison(
        a=a,
        b=b,
        headline=headline_table(a, b),
        per_class=per_class_table(a, b),
        changed=changed_predictions(a.predictions, b.predictions),
        params=params_table(a, b),
        same_test_set=same,
    )
