"""What the train stage and its MLflow logger process say to each other: typed, pickled messages.

Train -> logger: one :class:`Open`, one :class:`Begin`, then any :class:`Call` (each applies
itself to the best-effort :class:`~imgcls.tracking.run.Run`), then :class:`Close`. Logger ->
train: :class:`Started` or :class:`Failed`, and :class:`Done` after `Close`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcls.config import TrackingConfig

if TYPE_CHECKING:  # the train process never imports the run (nor mlflow)
    from imgcls.tracking.run import Run


@dataclass(frozen=True)
class Open:
    """Open the store (import mlflow, find the experiment) while the train stage starts up."""

    cfg: TrackingConfig  # `uri` already resolved
    run_name: str | None
    resolved: dict[str, Any]  # the whole params.yaml, defaults filled in
    splits_csv: str
    reports_dir: str


@dataclass(frozen=True)
class Begin:
    """Create the run, or reopen the interrupted training's run and log the epochs it lacks."""

    key: str = ""  # the training's own id (tag `imgcls.train_key`), known before the run exists
    resume_run_id: str | None = None
    resumed_from: int = 0  # epochs the checkpoint had done
    history: list[dict[str, float]] = field(default_factory=list)  # those epochs' rows


@dataclass(frozen=True)
class Close:
    """No more calls: reply :class:`Done` and exit."""


class Call:
    """One logging call; `what` names it in `not_logged` if it is lost."""

    @property
    def what(self) -> str:
        """How `not_logged` lists this call."""
        raise NotImplementedError

    def apply(self, run: Run) -> None:
        """Make the call on the run (best-effort: the run records what failed)."""
        raise NotImplementedError


@dataclass(frozen=True)
class LogMetrics(Call):
    """One batch of metrics (one epoch's row when `step` is set)."""

    metrics: dict[str, float]
    step: int | None = None

    @property
    def what(self) -> str:
        """'metrics (step 3)' or 'metrics'."""
        return "metrics" if self.step is None else f"metrics (step {self.step})"

    def apply(self, run: Run) -> None:
        """See :meth:`Run.log_metrics`."""
        run.log_metrics(self.metrics, step=self.step)


@dataclass(frozen=True)
class LogParams(Call):
    """Params (nested mappings are flattened)."""

    params: dict[str, Any]
    what = "params"

    def apply(self, run: Run) -> None:
        """See :meth:`Run.log_params`."""
        run.log_params(self.params)


@dataclass(frozen=True)
class SetTags(Call):
    """Tags, in one call."""

    tags: dict[str, Any]
    what = "tags"

    def apply(self, run: Run) -> None:
        """See :meth:`Run.set_tags`."""
        run.set_tags(self.tags)


@dataclass(frozen=True)
class LogDict(Call):
    """A JSON / YAML artifact."""

    data: Any
    artifact_file: str

    @property
    def what(self) -> str:
        """'artifact <file>'."""
        return f"artifact {self.artifact_file}"

    def apply(self, run: Run) -> None:
        """See :meth:`Run.log_dict`."""
        run.log_dict(self.data, self.artifact_file)


@dataclass(frozen=True)
class LogText(Call):
    """A text artifact."""

    text: str
    artifact_file: str

    @property
    def what(self) -> str:
        """'artifact <file>'."""
        return f"artifact {self.artifact_file}"

    def apply(self, run: Run) -> None:
        """See :meth:`Run.log_text`."""
        run.log_text(self.text, self.artifact_file)


@dataclass(frozen=True)
class LogImage(Call):
    """A PNG artifact from a PIL image or uint8 array."""

    image: Any
    artifact_file: str

    @property
    def what(self) -> str:
        """'artifact <file>'."""
        return f"artifact {self.artifact_file}"

    def apply(self, run: Run) -> None:
        """See :meth:`Run.log_image`."""
        run.log_image(self.image, self.artifact_file)


@dataclass(frozen=True)
class LogArtifact(Call):
    """A local file (or every file of a folder), uploaded."""

    path: Path
    artifact_path: str | None = None

    @property
    def what(self) -> str:
        """'artifact <folder>/<name>'."""
        name = Path(self.path).name
        return f"artifact {self.artifact_path}/{name}" if self.artifact_path else f"artifact {name}"

    def apply(self, run: Run) -> None:
        """See :meth:`Run.log_artifact`."""
        run.log_artifact(self.path, self.artifact_path)


@dataclass(frozen=True)
class End(Call):
    """The run's end status (the train stage only ends it as FAILED; evaluate finishes it)."""

    status: str = "FINISHED"
    what = "run status"

    def apply(self, run: Run) -> None:
        """See :meth:`Run.end`."""
        run.end(self.status)


@dataclass(frozen=True)
class Started:
    """The run exists (created, or reopened for a resumed training)."""

    run_id: str


@dataclass(frozen=True)
class Failed:
    """The store could not be opened or the run not created: the train stage stops."""

    message: str


@dataclass(frozen=True)
class Done:
    """Every call was applied; these could not be logged."""

    not_logged: list[str]
