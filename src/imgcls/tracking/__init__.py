"""MLflow at the edge: the only package that imports mlflow (in the train stage, only its logger).

- :mod:`~imgcls.tracking.store`: where runs go (URI resolution), the fail-fast probe, run tags.
- :mod:`~imgcls.tracking.run`: :class:`Run`, the best-effort run the stages log into.
- :mod:`~imgcls.tracking.logger`: the train stage's logger process (:class:`RunProcess`), a
  metrics / params / tags / artifacts forwarder fed typed messages
  (:mod:`~imgcls.tracking.messages`).

Imports nothing of imgcls.data, models, training or serving (layer 2 of docs/architecture.md).
"""

from imgcls.tracking.logger import RunProcess, finish_train_run, start_train_run
from imgcls.tracking.run import Run, describe_not_logged, open_store, resume_run, warn_not_logged
from imgcls.tracking.store import (
    TrackingError,
    artifact_location,
    file_sha256,
    flatten,
    git_info,
    is_main_rank,
    pipeline_tags,
    probe,
    repo_root,
    resolve_uri,
)

__all__ = [
    "Run",
    "RunProcess",
    "TrackingError",
    "artifact_location",
    "describe_not_logged",
    "file_sha256",
    "finish_train_run",
    "flatten",
    "git_info",
    "is_main_rank",
    "open_store",
    "pipeline_tags",
    "probe",
    "repo_root",
    "resolve_uri",
    "resume_run",
    "start_train_run",
    "warn_not_logged",
]
