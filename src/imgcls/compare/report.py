"""The comparison as files (Markdown, PNG, CSV), logged to B's run, and as a terminal table."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from imgcls.compare.diff import STEMS, Comparison, compare
from imgcls.compare.figures import agg_pyplot, plot_changed, plot_confusion_difference
from imgcls.compare.runs import RunData, client_for, load_run
from imgcls.io import atomic_path, write_csv, write_text


def _fmt(value: Any, signed: bool = False) -> str:
    """A number with 4 decimals ('+0.0123' when signed); '–' for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _who(run: RunData) -> str:
    """'exp1 (run 1a2b3c4d)'."""
    return f"{run.ref} (run {run.run_id[:8]})" if run.ref != run.run_id else f"run {run.run_id}"


def markdown(comp: Comparison, max_rows: int = 50) -> str:
    """The comparison as a Markdown report (figures referenced next to it)."""
    a, b = comp.a, comp.b
    parts = [
        f"# {a.ref} vs {b.ref}",
        f"A = {_who(a)}, B = {_who(b)}. Test set: {comp.same_test_set}.",
        "## Headline (test)",
        _md_table(
            ["metric", "A", "B", "B − A"],
            [
                [r.metric, _fmt(r.a), _fmt(r.b), _fmt(r.delta, True)]
                for r in comp.headline.itertuples()
            ],
        ),
        f"Prediction changes: **{len(comp.fixed)} fixed** by B, **{len(comp.broken)} broken** "
        f"by B, {int((comp.changed['change'] == 'other').sum())} still wrong but differently.",
        "## Per class (test), largest change first",
        _md_table(
            ["class", "support", "P A", "P B", "ΔP", "R A", "R B", "ΔR", "F1 A", "F1 B", "ΔF1"],
            [
                [str(r["class"]), str(int(r["support"])) if r["support"] == r["support"] else "–"]
                + [_fmt(r[f"{s}_{x}"], x == "delta") for s in STEMS for x in ("a", "b", "delta")]
                for _, r in comp.per_class.iterrows()
            ],
        ),
    ]
    if comp.diff is not None:
        parts += ["## Confusion matrix difference (B − A)", "![](confusion_diff.png)"]
    else:
        parts += [
            "## Confusion matrix difference",
            "Not drawn: the runs' classes differ or the model is multi-label "
            "(per-label counts are in each run's artifacts).",
        ]
    for what, rows, png in (
        ("Fixed by B", comp.fixed, "fixed"),
        ("Broken by B", comp.broken, "broken"),
    ):
        parts += [f"## {what} ({len(rows)})", f"![]({png}.png)"]
        if len(rows):
            parts.append(
                _md_table(
                    ["path", "true", "A", "B", "B's confidence"],
                    [
                        [r.path, r.label, r.predicted_a, r.predicted_b, f"{r.confidence_b:.3f}"]
                        for r in rows.head(max_rows).itertuples()
                    ],
                )
                + (
                    f"\n\n… and {len(rows) - max_rows} more in changed.csv"
                    if len(rows) > max_rows
                    else ""
                )
            )
    parts.append(f"## Params that differ ({len(comp.params)})")
    if len(comp.params):
        parts.append(
            _md_table(["param", "A", "B"], [[r.param, r.a, r.b] for r in comp.params.itertuples()])
        )
    else:
        parts.append("None: the difference is in the code or the data, not in params.yaml.")
    return "\n\n".join(parts) + "\n"


def terminal_table(comp: Comparison, rows: int = 10) -> str:
    """A short plain-text summary for the terminal."""
    lines = [f"A = {_who(comp.a)}  vs  B = {_who(comp.b)}", f"test set: {comp.same_test_set}", ""]
    lines.append(f"{'metric':<22}{'A':>9}{'B':>9}{'B − A':>10}")
    for r in comp.headline.itertuples():
        lines.append(f"{r.metric:<22}{r.a:>9.4f}{r.b:>9.4f}{r.delta:>+10.4f}")
    lines += [
        "",
        f"fixed by B: {len(comp.fixed)}   broken by B: {len(comp.broken)}   "
        f"changed, still wrong: {int((comp.changed['change'] == 'other').sum())}",
        "",
        f"{'class (largest change)':<22}{'F1 A':>8}{'F1 B':>8}{'ΔF1':>9}{'ΔP':>9}{'ΔR':>9}",
    ]
    for _, r in comp.per_class.head(rows).iterrows():
        lines.append(
            f"{str(r['class'])[:21]:<22}{_fmt(r['f1_a']):>8}{_fmt(r['f1_b']):>8}"
            f"{_fmt(r['f1_delta'], True):>9}{_fmt(r['precision_delta'], True):>9}"
            f"{_fmt(r['recall_delta'], True):>9}"
        )
    if len(comp.per_class) > rows:
        lines.append(f"... {len(comp.per_class) - rows} more classes in the report")
    changed = ", ".join(
        f"{r.param}: {r.a or '–'} -> {r.b or '–'}" for r in comp.params.itertuples()
    )
    lines += ["", f"params that differ: {changed or 'none'}"]
    if comp.out_dir is not None:
        lines.append(f"report: {comp.out_dir / 'compare.md'} (+ PNG figures, CSV tables)")
    if comp.not_logged:
        lines.append(f"NOT logged to B's run: {', '.join(comp.not_logged)}")
    elif comp.out_dir is not None:
        lines.append(f"logged to B's run {comp.b.run_id} under compare/{comp.out_dir.name}/")
    return "\n".join(lines)


def slug(ref: str) -> str:
    """A run reference as a folder-name part ('models:/imgcls@champion' -> 'imgcls@champion')."""
    text = re.sub(r"[^A-Za-z0-9@._-]+", "_", ref.removeprefix("models:/")).strip("_")
    return text[:60] or "run"


def write_report(comp: Comparison, out_dir: Path, root: Path) -> list[Path]:
    """compare.md, per_class.csv, changed.csv, confusion_diff.csv and the figures into `out_dir`."""
    plt = agg_pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    figures = {
        "fixed.png": plot_changed(comp.fixed, root, f"Fixed by B ({comp.b.ref})"),
        "broken.png": plot_changed(comp.broken, root, f"Broken by B ({comp.b.ref})"),
    }
    if comp.diff is not None:
        title = f"Test confusion, {comp.b.ref} − {comp.a.ref}"
        figures["confusion_diff.png"] = plot_confusion_difference(comp.diff, comp.a.classes, title)
    for name, fig in figures.items():
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        files.append(out_dir / name)
    if comp.diff is not None:  # the heatmap's numbers (rows: true class, columns: predicted)
        frame = pd.DataFrame(comp.diff, index=comp.a.classes, columns=comp.a.classes)
        write_csv(out_dir / "confusion_diff.csv", frame.rename_axis("true").reset_index())
        files.append(out_dir / "confusion_diff.csv")
    write_csv(out_dir / "per_class.csv", comp.per_class)
    write_csv(out_dir / "changed.csv", comp.changed)
    comp.out_dir = out_dir
    write_text(out_dir / "compare.md", markdown(comp))
    return [*files, out_dir / "per_class.csv", out_dir / "changed.csv", out_dir / "compare.md"]


def default_uri(root: Path) -> str:
    """The store the pipeline logs to: MLFLOW_TRACKING_URI, tracking.uri, or root/mlflow.db."""
    from imgcls.config import load_params, parse_params
    from imgcls.tracking.store import resolve_uri

    params_file = root / "params.yaml"
    params = load_params(params_file) if params_file.is_file() else parse_params({})
    return resolve_uri(params.tracking, root)


def compare_runs(
    a: str,
    b: str,
    out_dir: Path | str | None = None,
    tracking_uri: str | None = None,
    *,
    force: bool = False,
    log: bool = True,
    root: Path | None = None,
) -> Comparison:
    """Compare runs `a` and `b`, write the report (default reports/compare/<a>_vs_<b>/) and
    log it to B's run (best-effort, `log=False` to skip). `root`: where image paths resolve."""
    from imgcls.tracking import Run

    root = Path(root or Path.cwd())
    uri = tracking_uri or default_uri(root)
    client = client_for(uri)
    with tempfile.TemporaryDirectory() as tmp:
        run_a = load_run(client, a, Path(tmp))
        run_b = load_run(client, b, Path(tmp))
    comp = compare(run_a, run_b, force)
    out = Path(out_dir) if out_dir else root / "reports/compare" / f"{slug(a)}_vs_{slug(b)}"
    comp.files = write_report(comp, out, root)
    if log:
        run = Run(uri, run_b.run_id, client)
        run.log_artifact(out, f"compare/{out.name}")
        comp.not_logged = list(run.not_logged)
    return comp
