"""The human validation report (reports/validation.md, also a GitHub job summary)."""

from __future__ import annotations

from typing import Any


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
