"""Training on several nodes: two torchrun launchers as two nodes equal one node with two processes.

Each "node" is its own working copy of the same project and data (what `git clone` + `dvc pull`
gives every node of a cluster): its own decode cache, its own outputs folder. They meet only
through torchrun's c10d rendezvous on 127.0.0.1 and the tracking URI they share (docs/scale.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from _datasets import with_splits, write_pattern_dataset
from _mlflow_server import free_port
from _project import make_project
from _trainrun import TIMING_COLUMNS

LAUNCHER = (sys.executable, "-m", "torch.distributed.run")
# No BatchNorm, dropout or augmentation: with the global batch split evenly over 2 ranks the
# result depends only on which rank holds which rows, never on where the ranks run.
TINY = {
    "model": {"name": "mlp", "kwargs": {"hidden": [32], "dropout": 0.0}},
    "augment": {"train": [], "eval": []},
    "train": {
        "epochs": 3,
        "batch_size": 16,
        "lr": 0.01,
        "image_size": 16,
        "device": "cpu",
        "deterministic": True,
        "num_workers": 0,
    },
    "tracking": {"log_model": False},
}


def node_copy(origin: Path, dest: Path) -> Path:
    """A node's own working copy: the same commit and the same data files, nothing shared."""
    shutil.copytree(origin, dest, symlinks=True)
    return dest


def train_cmd() -> list[str]:
    """The train stage's entry point in the working copy (as dvc.yaml runs it)."""
    return ["pipeline/train.py", "--cache-dir", "data/cache"]


def node_env(tracking_uri: str) -> dict[str, str]:
    """One thread per process (deterministic on a shared 2-core box) and the shared store."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.pop("DVC_EXP_NAME", None)
    return env


def start_node(root: Path, rank: int, port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    """One torchrun launcher as node `rank` of 2 (one process), joining the c10d rendezvous."""
    cmd = [
        *LAUNCHER,
        "--nnodes",
        "2",
        "--node-rank",  # ignored by c10d (which orders nodes itself), read by static rendezvous
        str(rank),
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "imgcls-two-nodes",
        # c10d ranks nodes by address: distinct loopback addresses make node 0 rank 0 for sure
        "--local-addr",
        f"127.0.0.{rank + 1}",
        *train_cmd(),
    ]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def finished(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    """Wait for a launcher; its exit status, stdout and stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -9, out, err
    return proc.returncode, out, err


def weights(root: Path) -> dict[str, torch.Tensor]:
    """The trained weights in the node's models/model.pt."""
    return torch.load(root / "models/model.pt", weights_only=True)["state_dict"]


def history(root: Path) -> pd.DataFrame:
    """plots/train.csv without its wall-clock columns."""
    return pd.read_csv(root / "plots/train.csv").drop(columns=TIMING_COLUMNS)


def best_epoch(root: Path) -> dict[str, float]:
    """reports/train_details.json without its wall-clock figures."""
    data = json.loads((root / "reports/train_details.json").read_text())
    return {k: v for k, v in data.items() if k not in [*TIMING_COLUMNS, "train_time_s", "timing"]}


def cache_files(root: Path) -> list[str]:
    """Names of the decoded-image caches in the working copy."""
    return sorted(p.name for p in (root / "data/cache").glob("images-*.npy"))


# 40 s (quiet) to 80 s (load 14) on the shared 2-core box: two torchrun jobs of two processes
@pytest.mark.slow
def test_two_nodes_train_exactly_like_one_node_with_two_processes(tmp_path: Path) -> None:
    origin = make_project(tmp_path / "origin", **TINY)
    # the data every node pulls from the DVC remote: the images and their splits.csv
    splits = with_splits(write_pattern_dataset(origin, per_class=30))
    (origin / "data/processed").mkdir(parents=True)
    splits.to_csv(origin / "data/processed/splits.csv", index=False)
    one = node_copy(origin, tmp_path / "one-node")
    params = yaml.safe_load((one / "params.yaml").read_text())
    params["tracking"]["enabled"] = False  # the reference needs no run (and starts faster)
    (one / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    nodes = [node_copy(origin, tmp_path / f"node{r}") for r in (0, 1)]
    shared = tmp_path / "tracking"  # the tracking URI is the one thing the nodes share
    shared.mkdir()
    uri = f"sqlite:///{shared / 'mlflow.db'}"

    ref = subprocess.run(
        [*LAUNCHER, "--standalone", "--nproc-per-node", "2", *train_cmd()],
        cwd=one,
        env=node_env(f"sqlite:///{tmp_path / 'unused.db'}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr[-4000:]

    port = free_port()
    procs = [start_node(root, r, port, node_env(uri)) for r, root in enumerate(nodes)]
    results = [finished(p) for p in procs]
    for r, (code, _, err) in enumerate(results):
        assert code == 0, f"node {r} failed ({code}):\n{err[-4000:]}"
    (_, out0, err0), (_, out1, err1) = results

    # the same training, whether the two processes share a machine or not
    for name, tensor in weights(one).items():
        assert torch.equal(weights(nodes[0])[name], tensor), name
    pd.testing.assert_frame_equal(
        history(nodes[0]).drop(columns=["lr"]), history(one).drop(columns=["lr"])
    )
    assert best_epoch(nodes[0]) == best_epoch(one)
    assert out0.count("train: best epoch") == 1 and "epoch 3/3" in err0

    # each node decoded the same images into its own cache; only rank 0 (node 0) wrote outputs
    assert cache_files(nodes[0]) == cache_files(nodes[1]) == cache_files(one) != []
    for output in ("models/model.pt", "models/run.json", "metrics/train.json", "plots/train.csv"):
        assert (nodes[0] / output).is_file(), output
        assert not (nodes[1] / output).exists(), f"node 1 wrote {output}"
    assert "train: best epoch" not in out1 and "epoch 3/3" not in err1

    # rank 0 alone talked to MLflow: one run in the shared store, with every epoch's metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("imgcls").experiment_id])
    assert len(runs) == 1 and runs[0].info.status != "FAILED"  # evaluate ends it
    run_id = json.loads((nodes[0] / "models/run.json").read_text())["run_id"]
    assert runs[0].info.run_id == run_id
    logged = [m.value for m in client.get_metric_history(run_id, "val_accuracy")]
    assert logged == pytest.approx(history(one)["val_accuracy"].tolist())
