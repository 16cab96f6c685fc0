"""The retrain job's settings, results and errors, shared by its modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imgcls.errors import ImgclsError

SKIP_CI = "[skip ci]"  # GitHub skips push / pull_request workflows for commits carrying this
LOCK_FILE = "dvc.lock"
DVC_FILES = "*.dvc"  # git pathspec: without `:(glob)` magic `*` also matches `/`
REPRO_TAIL_LINES = 15  # of a failed `dvc repro`, quoted in the error and the report
# A public base URL of the MLflow UI for the report's run link (a repository *variable*, not a
# secret). The tracking URI itself never goes into the report: it can carry a login, and the
# report becomes a pull-request comment, which GitHub does not mask.
UI_URL_ENV = "IMGCLS_MLFLOW_UI_URL"


class RetrainError(ImgclsError):
    """The retrain flow cannot continue (repository, remote, data or a failed stage)."""


class GateFailed(RetrainError):
    """The retrained model scores more than the allowed margin below the baseline."""


@dataclass(frozen=True)
class RetrainConfig:
    """What to compare, where the pipeline's files are, and which side effects to perform."""

    root: Path  # repository root (git + DVC)
    base: str  # git ref whose committed metrics are the baseline (e.g. main, origin/main)
    max_drop: float  # largest allowed drop of `metric` below the baseline
    metric: str  # key in metrics_file, e.g. f1_macro (test macro-F1)
    metrics_file: str  # e.g. metrics/eval.json
    data_stage: str  # stage reading the tracked data (ingest)
    report: Path  # Markdown report file (also appended to $GITHUB_STEP_SUMMARY when set)
    validation_report: str  # e.g. reports/validation.md
    confusion_image: str  # e.g. reports/figures/confusion_matrix.png
    run_file: str  # e.g. models/run.json (MLflow run id + tracking URI)
    remote: str | None = None  # DVC remote name; None = the default remote
    push: bool = True
    commit: bool = True
    # after a passed gate, move the registry's `champion` to the version evaluate registered
    promote: bool = True
    logged_models: str = "models/logged_models.json"  # evaluate's record of that version


@dataclass(frozen=True)
class GateResult:
    """The metric gate's verdict."""

    metric: str
    value: float
    baseline: float | None  # None: the base ref has no committed metrics yet
    max_drop: float
    base: str

    @property
    def passed(self) -> bool:
        """True unless the value dropped more than `max_drop` below the baseline."""
        if self.baseline is None:
            return True
        return self.value >= self.baseline - self.max_drop - 1e-12  # float noise is no drop

    def describe(self) -> str:
        """One sentence for logs and the report."""
        if self.baseline is None:
            return (
                f"{self.metric} = {self.value:.4f}; {self.base} has no committed metrics "
                "yet, so there is no baseline: passed"
            )
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{self.metric} = {self.value:.4f} vs {self.baseline:.4f} on {self.base} "
            f"(change {self.value - self.baseline:+.4f}, allowed drop {self.max_drop:.4f}): "
            f"{verdict}"
        )


@dataclass
class RetrainResult:
    """What one retrain did."""

    changed_data: list[str] = field(default_factory=list)  # .dvc files changed since dvc.lock
    stale_stages: list[str] = field(default_factory=list)  # stages `dvc status` found outdated
    ran_stages: list[str] = field(default_factory=list)  # stages `dvc repro` actually ran
    gate: GateResult | None = None
    pushed: bool = False
    commit: str | None = None  # sha of the `[skip ci]` commit, None if nothing changed
    promotion: str = ""  # what happened to the registry's champion (one line)
    versus_champion: str = ""  # Markdown: the candidate against the champion (imgcls compare)
    report: str = ""  # the Markdown report
