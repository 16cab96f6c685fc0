"""The retrain report's comparison: the candidate model against the registry's current champion.

`imgcls compare` does the work (per-class deltas, the confusion difference, fixed / broken
images); this module only names the two models and never fails the job: a missing champion, a
champion evaluated before predictions were logged or an unreachable store become one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from imgcls.retrain.redaction import redact

CHAMPION = "champion"


def candidate_and_champion(logged_models: Path) -> tuple[str, str, str] | str:
    """(tracking URI, candidate URI, champion URI) from the evaluate stage's record, or why not."""
    try:
        info = json.loads(logged_models.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return f"{logged_models.name} is missing: nothing was registered"
    registered = info.get("registered_model") if isinstance(info, dict) else None
    uri = info.get("tracking_uri") if isinstance(info, dict) else None
    if not isinstance(registered, dict) or not registered.get("name") or not uri:
        return "no registered candidate (tracking off or tracking.register_model null)"
    name = registered["name"]
    return str(uri), f"models:/{name}/{registered['version']}", f"models:/{name}@{CHAMPION}"


def compare_with_champion(logged_models: Path, root: Path, out_dir: Path) -> str:
    """Markdown: the candidate (B) against the current champion (A), or one line saying why not."""
    found = candidate_and_champion(logged_models)
    if isinstance(found, str):
        return f"_Not compared: {found}._"
    uri, candidate, champion = found
    from imgcls.compare import compare_runs, markdown

    try:
        comp = compare_runs(champion, candidate, out_dir, uri, root=root)
    except Exception as err:  # no champion yet, an old champion without predictions, a store down
        first = (str(err).splitlines() or [""])[0][:300]
        return redact(f"_Not compared with `{champion}`: {first}_")
    if comp.a.run_id == comp.b.run_id:
        return f"_The candidate is already `{champion}`._"
    return redact(markdown(comp, max_rows=15) + f"\n\nFigures: `{out_dir}`")
