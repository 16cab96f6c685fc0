"""The train stage's MLflow run, created and fed by a separate, low-priority logger process.

The process (not a thread): on a 2-core box a thread shared the GIL and the CPU with training
and cost +14 % / +22 % of the train stage (bench/RESULTS.md, issue 7). It is spawned before the
train stage imports torch, so importing mlflow and opening the store use the core that those
imports leave idle; it runs at a low priority, so during training it only gets CPU time that
training leaves unused. The train process never imports mlflow: each call is a typed message
(:mod:`imgcls.tracking.messages`) pickled onto a pipe, applied in order.

It forwards metrics, params, tags, dicts, images and artifacts, and samples the machine's
system metrics into the run (:mod:`imgcls.tracking.sysmetrics`, unless
`tracking.system_metrics: false`) until the train stage closes it; models are logged by the
evaluate stage, on the same run, once they have been evaluated. A resumed training continues
the run its checkpoint names (:meth:`RunProcess.begin`): one run holds every epoch.

Long because the two ends of one pipe protocol (the train stage's handle and the logger's loop)
are easier to check against each other side by side; the messages themselves are in their own
module.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from imgcls.config import Params
from imgcls.tracking.messages import (
    Begin,
    Call,
    Close,
    Done,
    End,
    Failed,
    LogArtifact,
    LogDict,
    LogImage,
    LogMetrics,
    LogParams,
    LogText,
    Open,
    SetTags,
    Started,
)
from imgcls.tracking.run import warn_not_logged
from imgcls.tracking.store import TrackingError, flatten, pipeline_tags, probe, resolve_uri
from imgcls.tracking.sysmetrics import SystemMetrics, start_system_metrics

log = logging.getLogger("imgcls.tracking")

LOGGER_NICE = 19
# After its last reply the logger skips interpreter shutdown (os._exit): tearing down mlflow and
# SQLAlchemy took seconds that the train stage would wait for, and every call has been applied
# (and answered) by then.
_LOGGER_CODE = (
    "import os, sys; from imgcls.tracking.logger import logger_main; "
    "logger_main(int(sys.argv[1])); sys.stdout.flush(); sys.stderr.flush(); os._exit(0)"
)


class RunProcess:
    """Handle on the logger process: calls return at once and are applied in order.

    Until :meth:`begin` (the train stage calls it once it knows whether it resumes a
    checkpoint) calls are held here; the logger meanwhile imports mlflow and opens the store.
    :meth:`check` raises :class:`TrackingError` once the logger reports that the store or the
    run failed; :meth:`join` waits for every call and the logger's exit. If the logger dies,
    training goes on and the lost calls are listed in :attr:`not_logged`. POSIX only (the pipe
    is inherited with `pass_fds`).
    """

    def __init__(self, opening: Open) -> None:
        ours, theirs = multiprocessing.Pipe()
        fd = theirs.fileno()
        self._proc = subprocess.Popen([sys.executable, "-c", _LOGGER_CODE, str(fd)], pass_fds=[fd])
        theirs.close()
        self._conn = ours
        self.uri: str = opening.cfg.uri or ""
        self._run_id: str | None = None
        self._error: str | None = None
        self._done: Done | None = None
        self._held: list[Call] | None = []  # calls made before `begin` (None once begun)
        self.key: str | None = None  # set by `begin`
        self._closed = False
        self._lost: list[str] = []  # calls that never reached the logger
        self._outbox: queue.SimpleQueue[Open | Begin | Call | Close | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_all, name="imgcls-mlflow", daemon=True)
        self._sender.start()
        self._outbox.put(opening)

    # ------------------------------------------------------------------ plumbing

    def _send(self, call: Call) -> None:
        """Queue one call (held until :meth:`begin`)."""
        if self._closed:
            raise RuntimeError("this run's logger is already closed")
        if self._held is not None:
            self._held.append(call)
        else:
            self._outbox.put(call)

    def _send_all(self) -> None:
        """Sender thread: pickle queued messages onto the pipe (blocks here, never in training)."""
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except Exception:  # the logger exited (opening failed) or the call won't pickle
                if isinstance(message, Call):
                    self._lost.append(message.what)

    def _read(self, block: bool) -> None:
        """Apply the logger's replies (waits for one if `block`)."""
        try:
            while block or self._conn.poll():
                reply = self._conn.recv()
                if isinstance(reply, Started):
                    self._run_id = reply.run_id
                elif isinstance(reply, Failed):
                    self._error = reply.message
                elif isinstance(reply, Done):
                    self._done = reply
                block = False
        except (EOFError, OSError):  # the logger exited without saying why (crashed or killed)
            if self._run_id is None and self._error is None:
                self._error = f"the MLflow logger process exited ({self._proc.poll()})"
            if self._done is None:
                self._done = Done(["the rest (the logger process died)"])

    # ------------------------------------------------------------------ lifecycle

    def begin(
        self,
        resume_run_id: str | None = None,
        *,
        resume_key: str | None = None,
        resumed_from: int = 0,
        history: Sequence[Mapping[str, float]] = (),
    ) -> str:
        """Create the run, or reopen the resumed training's and log the `history` rows it lacks.

        The interrupted training's run is `resume_run_id`, else the run tagged `resume_key`
        (its checkpoint may predate the run id's arrival). Returns this training's key (the
        tag `imgcls.train_key`), known at once: a checkpoint stores it without waiting for the
        (low-priority) logger to create the run.
        """
        if self._held is None:
            raise RuntimeError("begin() was already called")
        self.key = resume_key or uuid.uuid4().hex
        rows = [dict(row) for row in history]
        self._outbox.put(Begin(self.key, resume_run_id, resumed_from, rows))
        for call in self._held:
            self._outbox.put(call)
        self._held = None
        return self.key

    def check(self) -> None:
        """Raise :class:`TrackingError` if the store or the run failed (no-op while pending)."""
        if self._error is None and self._done is None:
            self._read(block=False)
        if self._error is not None:
            raise TrackingError(self._error)

    @property
    def run_id(self) -> str:
        """The run id (waits until the logger has created or reopened the run)."""
        if self._held is not None:
            raise RuntimeError("the run id is known only after begin()")
        while self._run_id is None and self._error is None and self._done is None:
            self._read(block=True)
        self.check()
        assert self._run_id is not None
        return self._run_id

    def known_run_id(self) -> str | None:
        """The run id if the logger has reported it already (never waits)."""
        if self._run_id is None and self._error is None and self._done is None:
            self._read(block=False)
        return self._run_id

    @property
    def not_logged(self) -> list[str]:
        """What could not be logged (complete after :meth:`join`)."""
        return [*(self._done.not_logged if self._done else []), *self._lost]

    def join(self) -> None:
        """Wait for every queued call and the logger's exit; :class:`TrackingError` if failed."""
        if not self._closed:
            if self._held is not None:
                self.begin()
            self._closed = True
            self._outbox.put(Close())
            self._outbox.put(None)
            self._sender.join()
            while self._done is None:
                self._read(block=True)
            self._conn.close()
            self._proc.wait()
        if self._error is not None:
            raise TrackingError(self._error)

    def end(self, status: str = "FINISHED") -> None:
        """Queue the run's end status and wait for the logger (no-op if the run never started)."""
        if not self._closed:
            if self._held is not None:
                self._held = None  # never begun: no run exists, the logger just exits
            else:
                self._send(End(status))
        with contextlib.suppress(TrackingError):  # check() reports a start failure
            self.join()

    def warn_not_logged(self, stage: str) -> None:
        """One warning listing what this run could not log (after :meth:`join`)."""
        warn_not_logged(stage, self.uri, self._run_id, self.not_logged)

    # ------------------------------------------------------------------ calls

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue one metrics batch (see :meth:`Run.log_metrics`)."""
        self._send(LogMetrics(dict(metrics), step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue params (see :meth:`Run.log_params`)."""
        self._send(LogParams(dict(params)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (see :meth:`Run.set_tags`)."""
        self._send(SetTags(dict(tags)))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Queue a JSON / YAML artifact (see :meth:`Run.log_dict`)."""
        self._send(LogDict(data, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue a text artifact (see :meth:`Run.log_text`)."""
        self._send(LogText(text, artifact_file))

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Queue a PNG artifact (see :meth:`Run.log_image`)."""
        self._send(LogImage(image, artifact_file))

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Queue a file upload (see :meth:`Run.log_artifact`)."""
        self._send(LogArtifact(Path(path), artifact_path))


# ---------------------------------------------------------------------- the logger process


def logger_main(fd: int) -> None:
    """The logger process: open the store, begin the run, then apply the calls in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the train process ends the run
    os.nice(LOGGER_NICE)
    from imgcls.stage import setup_logging
    from imgcls.tracking.run import Run, open_store

    setup_logging()
    conn = Connection(fd)
    run: Run | None = None
    monitor: SystemMetrics | None = None
    try:
        opening: Open = conn.recv()
        try:
            client, exp_id = open_store(opening.cfg.experiment, opening.cfg.uri or "")
        except Exception as err:
            conn.send(Failed(_start_failure(err)))
            return
        begin = conn.recv()
        if isinstance(begin, Close):  # the stage ended (failed) before the run was begun
            conn.send(Done([]))
            return
        try:
            run = _begin_run(client, exp_id, opening, begin)
        except Exception as err:
            conn.send(Failed(_start_failure(err)))
            return
        conn.send(Started(run.run_id))
        if opening.cfg.system_metrics:  # samples the machine from a thread of this process
            monitor = start_system_metrics(run.uri, run.run_id, resume=begin.resumed_from > 0)
        while not isinstance(message := conn.recv(), Close):
            _apply(run, message)
        if monitor is not None:  # before Done: the train stage waits for the last sample
            monitor.stop()
        conn.send(Done(run.not_logged))
    # The train process died without closing (mid-message when killed while its sender wrote:
    # OSError "end of file during message"): don't leave the run RUNNING.
    except (EOFError, OSError):
        if run is not None:
            run.end("FAILED")  # a resumed training reopens it
    finally:  # whatever ended the loop, the sampling thread ends with it (stop is idempotent)
        if monitor is not None:
            monitor.stop()


def _apply(run: Any, call: Call) -> None:
    """One call; a local error (not the store) is logged and listed, the logger goes on."""
    try:
        call.apply(run)
    except Exception as err:
        log.warning("MLflow: %s failed: %s: %s", call.what, type(err).__name__, err)
        run.not_logged.append(call.what)


def _start_failure(err: Exception) -> str:
    """The one-line message the train stage raises when the run could not be created."""
    if isinstance(err, TrackingError):
        return str(err)
    first = (str(err).splitlines() or [""])[0][:200]
    return f"cannot start the MLflow run ({type(err).__name__}: {first})"


def _begin_run(client: Any, exp_id: str, opening: Open, begin: Begin) -> Any:
    """In the logger: create (or reopen) the run, log params, config, data reports, history."""
    import yaml

    from imgcls.tracking.run import Run

    uri = opening.cfg.uri or ""
    resolved, reports_dir = opening.resolved, Path(opening.reports_dir)
    tags = {**pipeline_tags(Path(opening.splits_csv)), "model.name": resolved["model"]["name"]}
    run = None
    resumed = begin.resumed_from > 0
    if resumed:
        try:
            run_id = begin.resume_run_id or _run_with_key(client, exp_id, begin.key)
            run = Run.reopen(client, uri, run_id, exp_id)
        except Exception as err:  # another store, a deleted run: the curve goes to a new run
            log.warning(
                "cannot reopen the MLflow run of the interrupted training (%s: %s); logging "
                "every epoch to a new run instead",
                type(err).__name__,
                (str(err).splitlines() or [""])[0][:200],
            )
    if run is None:
        tags["imgcls.train_key"] = begin.key
        run = Run.create(client, uri, exp_id, run_name=opening.run_name, tags=tags)
        run.log_params(resolved)
        logged: set[int] = set()
    else:
        run.set_tags({**tags, "train.resumed_from_epoch": str(begin.resumed_from)})
        _log_new_params(run, resolved)
        first_key = next((k for row in begin.history for k in row if k != "epoch"), None)
        logged = run.logged_steps(first_key) if first_key else set()
    run.log_text(yaml.safe_dump(resolved, sort_keys=False), "config/params.resolved.yaml")
    for name in ("validation.md", "validation.json", "split.json"):
        if (reports_dir / name).is_file():
            run.log_artifact(reports_dir / name, "data")
    # Epochs the interrupted attempt trained but did not get to log (it logs after saving the
    # checkpoint), or all of them in a new run: one run then holds the whole curve.
    for row in begin.history:
        step = int(row["epoch"])
        if step not in logged:
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)
    return run


def _run_with_key(client: Any, exp_id: str, key: str) -> str:
    """The id of the run tagged `imgcls.train_key = key` (ValueError if there is none)."""
    runs = client.search_runs([exp_id], f"tags.`imgcls.train_key` = '{key}'", max_results=1)
    if not key or not runs:
        raise ValueError(f"no run tagged imgcls.train_key = {key!r}")
    return runs[0].info.run_id


def _log_new_params(run: Any, resolved: Mapping[str, Any]) -> None:
    """On a reopened run: the params it lacks; a changed value keeps the first attempt's."""
    from imgcls.tracking.run import _param_value

    existing = run.logged_params()
    flat = flatten(resolved)
    changed = sorted(k for k in flat if k in existing and existing[k] != _param_value(flat[k]))
    if changed:  # only settings outside the checkpoint's config hash (device, workers) can
        log.info("resumed run keeps its first values of %s (MLflow params are immutable)", changed)
    new = {k: v for k, v in flat.items() if k not in existing}
    if new:
        run.log_params(new)


# ---------------------------------------------------------------------- the train stage's calls


def start_train_run(
    params: Params,
    *,
    splits_csv: Path,
    reports_dir: Path,
    device: str | None = None,
    extra_dicts: Mapping[str, Any] | None = None,
) -> RunProcess | None:
    """Start the train stage's logger process (None when tracking is off).

    Raises :class:`TrackingError` at once (milliseconds, before any training) if the store is
    obviously unusable (server not answering, SQLite folder missing / read-only). Call it
    before the slow imports: the logger then imports mlflow and opens the store meanwhile. The
    run itself is created (or a resumed one reopened) at :meth:`RunProcess.begin`.
    """
    if not params.tracking.enabled:
        return None
    cfg = params.tracking.model_copy(update={"uri": resolve_uri(params.tracking)})
    probe(cfg.uri)
    opening = Open(
        cfg=cfg,
        run_name=os.environ.get("DVC_EXP_NAME") or None,
        resolved=params.to_dict(),
        splits_csv=str(splits_csv),
        reports_dir=str(reports_dir),
    )
    run = RunProcess(opening)
    if device is not None:
        run.set_tags({"device": device})
    for name, data in (extra_dicts or {}).items():
        run.log_dict(data, name)
    return run


def finish_train_run(
    run: RunProcess | None, *, best_epoch: int, best_value: float, monitor: str
) -> dict[str, Any]:
    """Log the best epoch, wait for the logger; what `models/run.json` records.

    The run stays RUNNING: the evaluate stage logs the test metrics and both models into it
    and closes it.
    """
    if run is None:
        return {"run_id": None, "tracking_uri": None, "not_logged": []}
    run.log_metrics({"best_epoch": best_epoch, f"best_{monitor}": best_value})
    run.join()
    run.warn_not_logged("train")
    return {"run_id": run.run_id, "tracking_uri": run.uri, "not_logged": run.not_logged}
