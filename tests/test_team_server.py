"""A team tracking server: `mlflow server` on a real PostgreSQL, artifacts proxied to a folder.

One PostgreSQL (initdb into a temporary folder, unprivileged user, 127.0.0.1) and one
`mlflow server --backend-store-uri postgresql://... --artifacts-destination ...` serve the whole
module. The pipeline runs against it with MLFLOW_TRACKING_URI only; everything is read back over
HTTP (and the rows straight from PostgreSQL). Then four experiments queued with
`dvc exp run --queue` run two at a time (`dvc queue start -j 2`): every run complete, none crossed.
Needs Debian's `postgresql` package: skipped with the reason outside CI, a failure where CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from _ci import require_tool
from _mlflow_server import Server, run, start_server
from _postgres import INSTALL, Postgres, missing_postgres, postgres
from _project import BIN, make_project, sh

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("team_server")]

# a small CNN and 2 epochs: the digits pipeline end to end in seconds, augmentation included
SMALL = {"model": {"kwargs": {"widths": [8, 16], "dropout": 0.1}}, "train": {"epochs": 2}}
# the queued experiments: each differs from the baseline (lr 0.003, 2 epochs), else DVC would
# find it already done and run nothing; distinct learning rates, so a crossed run shows
EXPERIMENTS = {
    "lr-1e-3-e1": {"train.lr": "0.001", "train.epochs": "1"},
    "lr-2e-3-e2": {"train.lr": "0.002", "train.epochs": "2"},
    "lr-1e-2-e1": {"train.lr": "0.01", "train.epochs": "1"},
    "lr-2e-2-e2": {"train.lr": "0.02", "train.epochs": "2"},
}
# what every pipeline run must hold at the end, whichever stage logged it
ARTIFACTS = {"evaluation/confusion_matrix.json", "figures/augmentation_grid.png"}


@pytest.fixture(scope="module")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Postgres, Server]]:
    """PostgreSQL + `mlflow server` (2 workers, proxied artifacts) for the module."""
    require_tool(missing_postgres(), INSTALL)
    folder = tmp_path_factory.mktemp("team-server")
    with postgres() as pg:
        # creating MLflow's schema on an empty database takes a while on a loaded box
        server = start_server(folder, timeout=240, backend=pg.uri, workers=2)
        try:
            yield pg, server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def team_project(
    tmp_path_factory: pytest.TempPathFactory, team_server: tuple[Postgres, Server]
) -> Path:
    """The pipeline reproduced against the team server, its results committed (a baseline)."""
    root = make_project(tmp_path_factory.mktemp("team") / "proj", **SMALL)
    run("dvc", "repro", cwd=root, uri=team_server[1].url)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "baseline", cwd=root)
    return root


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run, listed over HTTP, folders walked."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def logged_models(client: MlflowClient, run) -> list:
    """The models logged from a run (MLflow 3 LoggedModel entities)."""
    return client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    ).to_list()


def test_pipeline_against_postgres_server_reads_back_over_http(
    team_project: Path, team_server: tuple[Postgres, Server], tmp_path: Path
) -> None:
    import psycopg

    pg, server = team_server
    root = team_project
    assert not (root / "mlflow.db").exists()  # MLFLOW_TRACKING_URI won over the default
    info = json.loads((root / "models/run.json").read_text())
    assert info["tracking_uri"] == server.url and info["not_logged"] == []

    client = MlflowClient(server.url)  # over HTTP, like every team member
    got = client.get_run(info["run_id"])
    assert got.info.status == "FINISHED"
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    local = json.loads((root / "reports/eval_details.json").read_text())
    metrics = got.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(local["accuracy"])  # evaluate's
    assert metrics["best_epoch"] >= 1  # train's
    history = client.get_metric_history(info["run_id"], "val_loss")
    assert [m.step for m in history] == [1, 2]
    local_history = pd.read_csv(root / "plots/train.csv")
    assert [m.value for m in history] == pytest.approx(local_history["val_loss"].tolist())
    assert got.data.params["train.epochs"] == "2"
    assert got.data.tags["git.commit"] and got.data.tags["data.splits_sha256"]

    assert all_artifacts(client, info["run_id"]) >= ARTIFACTS
    downloaded = client.download_artifacts(
        info["run_id"], "evaluation/confusion_matrix.json", str(tmp_path / "dl")
    )
    local_cm = json.loads((root / "reports/figures/confusion_matrix.json").read_text())
    assert json.loads(Path(downloaded).read_text()) == local_cm
    assert logged_models(client, got), "no model logged from the run"
    # the server, not the client, wrote the files: into its --artifacts-destination
    stored = Path(server.proc.args[server.proc.args.index("--artifacts-destination") + 1])
    assert list(stored.rglob(f"{info['run_id']}/**/confusion_matrix.json"))

    # and the run's rows are in PostgreSQL, not in some SQLite file
    with psycopg.connect(pg.uri) as conn:
        keys = {k for (k,) in conn.execute(
            "SELECT key FROM latest_metrics WHERE run_uuid = %s", (info["run_id"],)
        )}  # fmt: skip
        (steps,) = conn.execute(
            "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'val_loss'",
            (info["run_id"],),
        ).fetchone()
    assert keys == set(metrics) and steps == 2


def queue_status(root: Path) -> tuple[dict[str, str], bool]:
    """`dvc queue status`: experiment name -> Queued / Running / Success / Failed; any worker?"""
    out = run("dvc", "queue", "status", cwd=root, uri=None).stdout
    status = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] in EXPERIMENTS:
            status[fields[1]] = fields[-1]
    return status, "0 active, 0 idle" not in out


def start_queue(root: Path, uri: str, jobs: int) -> None:
    """`dvc queue start -j JOBS`; its workers inherit MLFLOW_TRACKING_URI from it."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env["MLFLOW_TRACKING_URI"] = uri
    # to a file, not a pipe: the detached workers keep the command's stdout open until they exit
    with open(root.parent / "queue-start.log", "ab") as log:
        done = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
    assert done.returncode == 0, (root.parent / "queue-start.log").read_text()


def stop_queue(root: Path, timeout: float = 120) -> None:
    """`dvc queue stop`, then wait until its idle workers have exited."""
    run("dvc", "queue", "stop", cwd=root, uri=None, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and queue_status(root)[1]:
        time.sleep(2)


def run_queue(root: Path, uri: str, jobs: int, timeout: float = 1800) -> tuple[dict, int]:
    """Start the queue and poll it until every experiment has finished (or failed).

    Returns the statuses and how often the queue had to be restarted: with several workers,
    DVC's file-based celery broker can kill a worker (JSONDecodeError on a half-written
    message) and leave experiments queued with no worker alive (upstream treeverse/dvc#10398,
    #10428). Starting the queue again runs them; the runs on the server must still be whole.
    """
    start_queue(root, uri, jobs)
    restarts = 0
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(5)  # each poll is a dvc process: not too often on a busy box
        status, workers = queue_status(root)
        done = [s in {"Success", "Failed"} for s in status.values()]
        if len(status) == len(EXPERIMENTS) and all(done):
            return status, restarts
        if time.monotonic() > deadline:
            raise AssertionError(f"queue not done after {timeout} s: {status}")
        if not workers and "Running" not in status.values():
            time.sleep(5)  # a worker may be between tasks: look twice before restarting
            status, workers = queue_status(root)
            if not workers and "Queued" in status.values():
                restarts += 1
                assert restarts <= 3, f"queued experiments never start: {status}"
                start_queue(root, uri, jobs)


def exp_refs(root: Path) -> dict[str, str]:
    """Experiment name -> its git ref (refs/exps/.../<name>)."""
    out = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps", cwd=root).stdout
    return {ref.rsplit("/", 1)[-1]: ref for ref in out.split() if "/" in ref}


def test_four_queued_experiments_two_at_a_time_all_recorded_none_crossed(
    team_project: Path, team_server: tuple[Postgres, Server]
) -> None:
    _, server = team_server
    root = team_project
    for name, values in EXPERIMENTS.items():
        sets = [arg for key, value in values.items() for arg in ("-S", f"{key}={value}")]
        run("dvc", "exp", "run", "--queue", "--name", name, *sets, cwd=root, uri=server.url)
    start = time.monotonic()
    try:
        status, restarts = run_queue(root, server.url, jobs=2)
    finally:
        stop_queue(root)
    elapsed = time.monotonic() - start
    if set(status.values()) != {"Success"}:
        logs = {
            n: run("dvc", "queue", "logs", n, cwd=root, uri=None, check=False).stdout[-3000:]
            for n, s in status.items()
            if s != "Success"
        }
        raise AssertionError(f"experiments failed: {status}\n{logs}")
    print(f"4 experiments, 2 at a time, on PostgreSQL: {elapsed:.0f} s, {restarts} queue restarts")

    client = MlflowClient(server.url)
    baseline = client.get_run(json.loads((root / "models/run.json").read_text())["run_id"])
    refs = exp_refs(root)
    for name, values in EXPERIMENTS.items():
        runs = client.search_runs(
            [baseline.info.experiment_id], filter_string=f"attributes.run_name = '{name}'"
        )
        assert len(runs) == 1, f"{name}: {len(runs)} runs"
        got = runs[0]
        run_id = got.info.run_id
        assert got.info.status == "FINISHED", name
        # its own parameters ...
        for key, value in values.items():
            assert float(got.data.params[key]) == float(value), (name, key)
        # ... every metric the pipeline logs, from both stages ...
        assert set(got.data.metrics) == set(baseline.data.metrics), name
        epochs = int(values["train.epochs"])
        history = client.get_metric_history(run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, epochs + 1)), name
        # ... equal to what this experiment itself wrote (its git ref), not to a neighbour's
        assert name in refs, f"{name} left no experiment ref: {sorted(refs)}"
        mine = json.loads(sh("git", "show", f"{refs[name]}:metrics/eval.json", cwd=root).stdout)
        assert got.data.metrics["test_accuracy"] == pytest.approx(mine["accuracy"]), name
        curve = sh("git", "show", f"{refs[name]}:plots/train.csv", cwd=root).stdout
        assert [m.value for m in history] == pytest.approx(_column(curve, "val_loss")), name
        # ... and every artifact and a logged model
        assert all_artifacts(client, run_id) == all_artifacts(client, baseline.info.run_id)
        assert all_artifacts(client, run_id) >= ARTIFACTS
        assert logged_models(client, got), f"{name}: no model logged"


def _column(csv_text: str, column: str) -> list[float]:
    """One numeric column of a CSV given as text."""
    return pd.read_csv(StringIO(csv_text))[column].astype(float).tolist()
