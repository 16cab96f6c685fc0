"""The human split report (reports/split.md) and the excluded rows' thumbnail captions."""

from __future__ import annotations

from typing import Any

from imgcls.data.split.common import SPLITS

MAX_MARKDOWN_EXCLUDED = 100  # excluded rows listed in reports/split.md (the JSON lists more)


def render_split_markdown(report: dict[str, Any], figure: str | None = None) -> str:
    """The human split report: rows per class and split, leakage, excluded rows with twins."""
    lines = ["# Split", ""]
    sp = report["splits"]
    lines.append(
        ", ".join(f"{s}: {sp[s]['rows']} rows in {sp[s]['groups']} groups" for s in SPLITS)
        + f"; worst per-class share deviation {report['worst_deviation_pp']:.2f} pp."
    )
    lines += ["", "| class | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
    for label, row in report["counts"].items():
        lines.append(f"| {label} | " + " | ".join(str(row[s]) for s in SPLITS) + " |")
    leak = report["leakage"]
    near = leak["no_near_duplicate"]
    lines += [
        "",
        "## Leakage checks",
        "",
        f"- groups in two splits: {leak['shared_groups']}",
        f"- byte-identical files in two splits: {leak['shared_sha256']}",
        "- verified near-duplicate pairs in two splits: "
        + ("not checked" if near is None else str(leak["near_duplicate_pairs"])),
    ]
    ex = report.get("excluded") or {"rows": 0}
    if ex["rows"]:
        lines += [
            "",
            f"## Kept out of train and val ({ex['rows']} rows)",
            "",
            "The test split is exactly the delivered test set. These rows were not delivered as "
            "test but duplicate (or share a group with) a delivered test image, so training on "
            "them would leak the test set; they are in no split.",
            "",
            "| path | label | test twin | twin's label | why | similarity |",
            "|---|---|---|---|---|---|",
        ]
        for r in ex["rows_listed"][:MAX_MARKDOWN_EXCLUDED]:
            simil = "" if r["similarity"] is None else f"{r['similarity']:.4f}"
            lines.append(
                f"| {r['path']} | {r['label']} | {r['twin']} | {r['twin_label']} | "
                f"{r['reason']} | {simil} |"
            )
        if ex["rows"] > MAX_MARKDOWN_EXCLUDED:
            lines.append(f"\n…and {ex['rows'] - MAX_MARKDOWN_EXCLUDED} more (reports/split.json).")
        if figure:
            lines += ["", f"![each excluded row beside its test twin]({figure})"]
    if report["warnings"]:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in report["warnings"])]
    return "\n".join(lines) + "\n"


def excluded_strips(report: dict[str, Any], limit: int = 24) -> list[tuple[str, list[str]]]:
    """(caption, [row, twin]) per excluded row, for the thumbnail sheet."""
    return [
        (
            f"{r['label']} vs test {r['twin_label']}: {r['reason'].split(' of ')[0]}",
            [r["path"], r["twin"]],
        )
        for r in (report.get("excluded") or {}).get("rows_listed", [])[:limit]
    ]
