"""The CI retrain flow as one function: detect change, pull, repro, gate, push, commit, report.

`.github/workflows/retrain.yml` runs exactly this (`imgcls retrain`), so the job can be run and
tested anywhere with any DVC remote, a local folder included. The order is what makes it safe:
nothing is pushed or committed unless `dvc repro` succeeded and the metric gate passed.

Why data changes need help: the `ingest` stage reads `data.source` (e.g. a `dvc add`-ed
`data/images/`), but that folder is not a dependency in `dvc.yaml` (the path is configurable),
so DVC alone would not rerun ingest when only the images change. The flow therefore compares
the `.dvc` files with the last commit that wrote `dvc.lock` and forces the data stage when one
changed; later stages then rerun only if the manifest changed.

Modules, one job each: `base` (settings, results, errors), `redaction` (secrets out of what
leaves the runner), `tools` (git / dvc subprocesses), `detect` (change detection, `dvc repro`),
`gate` (the metric gate), `promote` (`imgcls promote`; champion after a passed gate), `report`
(Markdown), `job` (the flow).
"""

from imgcls.retrain.base import (
    SKIP_CI,
    UI_URL_ENV,
    GateFailed,
    GateResult,
    RetrainConfig,
    RetrainError,
    RetrainResult,
)
from imgcls.retrain.detect import changed_data_files, ran_stages
from imgcls.retrain.gate import baseline_metric, read_metric, resolve_ref
from imgcls.retrain.job import commit_message, commit_results, git_tracked_outputs, retrain
from imgcls.retrain.redaction import REDACTED, redact
from imgcls.retrain.report import build_report, mlflow_link, validation_summary, write_report
from imgcls.retrain.tools import run

__all__ = [
    "REDACTED",
    "SKIP_CI",
    "UI_URL_ENV",
    "GateFailed",
    "GateResult",
    "RetrainConfig",
    "RetrainError",
    "RetrainResult",
    "baseline_metric",
    "build_report",
    "changed_data_files",
    "commit_message",
    "commit_results",
    "git_tracked_outputs",
    "mlflow_link",
    "ran_stages",
    "read_metric",
    "redact",
    "resolve_ref",
    "retrain",
    "run",
    "validation_summary",
    "write_report",
]
