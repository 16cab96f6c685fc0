"""`imgcls tune`: real Optuna, a real MLflow SQLite store, real digits data from the pipeline."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml

from _datasets import REPO
from _project import BIN, make_project, sh
from imgcls.config import ConfigError, load_params, parse_params, with_overrides
from imgcls.tune import (
    TuneError,
    TuneOptions,
    baseline_values,
    dvc_command,
    plot_importances,
    study_name,
    tune,
)

DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())


def _params(tune_section: dict) -> dict:
    """params.yaml's defaults with another `tune:` section."""
    return {**DEFAULTS, "tune": tune_section}


# ---------------------------------------------------------------------- the tune: section


@pytest.mark.parametrize(
    ("tune_section", "expected"),
    [
        ({"n_trial": 3}, ["tune.n_trial: unknown key", "allowed: space, n_trials, timeout"]),
        ({"pruner": {"warmup": 1}}, ["tune.pruner.warmup", "allowed: enabled, startup_trials"]),
        (
            {"space": {"train.lrr": {"type": "float", "low": 0.1, "high": 1}}},
            ["tune.space.train.lrr", "train has no 'lrr'", "lr, weight_decay"],
        ),
        (
            {"space": {"train.lr": {"type": "float", "low": 0, "high": 1}}},
            ["tune.space.train.lr", "0 is not allowed", "greater than 0"],
        ),
        (
            {"space": {"train.lr": {"type": "float", "low": 1e-3, "hihg": 1}}},
            ["tune.space.train.lr", "unknown key(s) ['hihg']", "allowed: type, low, high, log"],
        ),
        (
            {"space": {"train.lr": {"type": "uniform", "low": 1e-3, "high": 1}}},
            ["tune.space.train.lr", "type float, int or categorical"],
        ),
        (
            {"space": {"data.source": {"type": "categorical", "choices": ["digits"]}}},
            ["tune.space.data.source", "only train.*, model.* and augment.*"],
        ),
        (
            {"space": {"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}},
            ["tune.space.train.lr: low 0.1 must be below high 0.01"],
        ),
        (
            {"space": {"augment.train.5.p": {"type": "float", "low": 0, "high": 1}}},
            ["tune.space.augment.train.5.p", "augment.train has no '5'", "indices 0..0"],
        ),
        (
            {"space": {"train.optimizer": {"type": "categorical", "choices": ["adamw", "lion"]}}},
            ["tune.space.train.optimizer", "'lion' is not allowed"],
        ),
    ],
)
def test_bad_tune_section_names_the_key_and_the_fix(tune_section: dict, expected: list) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(_params(tune_section))
    for text in expected:
        assert text in str(err.value), str(err.value)


def test_space_accepts_train_model_and_augment_keys() -> None:
    space = {
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "train.epochs": {"type": "int", "low": 2, "high": 8, "step": 2},
        "model.kwargs.dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "model.name": {"type": "categorical", "choices": ["simple_cnn", "lenet5"]},
        "augment.train.0.p": {"type": "float", "low": 0.0, "high": 1.0},
    }
    params = parse_params(_params({"space": space}))
    assert list(params.tune.space) == list(space)
    changed = with_overrides(params, {"augment.train.0.p": 0.25, "model.kwargs.dropout": 0.1})
    assert changed.augment.train[0].model_dump()["p"] == 0.25
    assert changed.model.kwargs == {**params.model.kwargs, "dropout": 0.1}
    assert params.augment.train[0].model_dump()["p"] == 0.7  # the original is untouched


def test_dvc_command_round_trips_values_and_adds_missing_keys() -> None:
    raw = {"train": {"lr": 0.003}, "model": {"kwargs": {"dropout": 0.2}}}
    best = {"train.lr": 0.00644616890557966, "model.kwargs.dropout": 0.1, "train.ema_decay": 0.99}
    cmd = dvc_command(best, Path("params.yaml"), raw)
    assert cmd == (
        "dvc exp run -S train.lr=0.00644616890557966 -S model.kwargs.dropout=0.1 "
        "-S +train.ema_decay=0.99"
    )
    other = dvc_command({"model.name": "lenet5"}, Path("conf/p.yaml"), {"model": {"name": "x"}})
    assert other == "dvc exp run -S conf/p.yaml:model.name=lenet5"


def test_study_name_follows_what_the_trials_train() -> None:
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    base = parse_params(_params({"space": space}))
    name = study_name(base, "sha")
    more = parse_params(_params({"space": space, "n_trials": 99, "timeout": 60}))
    assert study_name(more, "sha") == name  # budgets do not change the question
    other_lr = parse_params({**_params({"space": space}), "train": {**DEFAULTS["train"], "lr": 1}})
    assert study_name(other_lr, "sha") == name  # the searched key's own value is irrelevant
    epochs = parse_params(
        {**_params({"space": space}), "train": {**DEFAULTS["train"], "epochs": 2}}
    )
    assert study_name(epochs, "sha") != name
    assert study_name(base, "other data") != name
    wider = {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}}
    assert study_name(parse_params(_params({"space": wider})), "sha") != name


def test_baseline_trial_only_when_params_yaml_lies_inside_the_space() -> None:
    inside = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}
    assert baseline_values(parse_params(_params({"space": inside}))) == {"train.lr": 0.003}
    outside = {"train.lr": {"type": "float", "low": 1e-2, "high": 1e-1}}
    assert baseline_values(parse_params(_params({"space": outside}))) is None


def test_tune_without_splits_says_to_run_the_split_stage(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(DEFAULTS))
    with pytest.raises(TuneError, match=r"missing\.csv not found.*dvc repro split"):
        tune(TuneOptions(params_path=tmp_path / "params.yaml", splits=tmp_path / "missing.csv"))
    empty = {**DEFAULTS, "tune": {"space": {}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(empty))
    with pytest.raises(TuneError, match="tune.space is empty"):
        tune(TuneOptions(params_path=tmp_path / "params.yaml"))


def test_importances_need_two_completed_trials() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 0.01), 1)
    assert plot_importances(study) is None
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 0.01), 5)
    fig = plot_importances(study)
    assert fig is not None
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[-1] == "x"  # the parameter that explains the objective comes out on top


# ---------------------------------------------------------------------- end to end

TUNE = {
    # lr 1e-7 cannot learn in 3 epochs. The pruner starts once two trials completed (the
    # baseline, lr 0.01, and with seed 42 a 1e-7 one): from then on every 1e-7 trial is below
    # the median after its first epoch and must be stopped there.
    "space": {
        "train.lr": {"type": "categorical", "choices": [0.01, 1.0e-7]},
        "model.kwargs.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    },
    "n_trials": 5,
    "startup_trials": 3,
    "pruner": {"enabled": True, "startup_trials": 2, "warmup_epochs": 0},
}


@pytest.fixture(scope="module")
def split_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy (tiny MLP on 8x8 digits) with `dvc repro split` run and committed."""
    root = make_project(
        tmp_path_factory.mktemp("tune") / "proj",
        model={"name": "mlp", "kwargs": {"hidden": [64], "dropout": 0.2}},
        augment={"train": []},
        train={"image_size": 8, "epochs": 3, "lr": 0.01, "device": "cpu", "scheduler": "constant"},
        tune=TUNE,
    )
    sh("dvc", "repro", "split", cwd=root)
    (root / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/optuna.db\n/data/cache/\n")
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "split", cwd=root)
    return root


def _copy(project: Path, dest: Path) -> Path:
    """The split project (git, DVC cache and data) without any study or MLflow store."""
    shutil.copytree(
        project, dest, ignore=shutil.ignore_patterns("mlflow.db", "optuna.db", "mlruns", "tune")
    )
    return dest


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _study(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'optuna.db'}")


def _mid_trial(study: optuna.Study) -> bool:
    """At least 3 trials finished and a later one running, with its MLflow run already open."""
    last = study.trials[-1]
    # An interrupt before the trial's run exists leaves no run to check as KILLED
    return (
        _finished(study) >= 3
        and last.state.name == "RUNNING"
        and "mlflow_run_id" in last.user_attrs
    )


def _finished(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(states=states))


@pytest.mark.slow
def test_tune_prunes_logs_parent_and_children_and_dvc_reproduces_the_best(
    split_project: Path,
) -> None:
    root = split_project
    out = sh("imgcls", "tune", cwd=root)
    best = yaml.safe_load((root / "reports/tune/best.yaml").read_text())
    study = _study(root, best["study"])
    states = [t.state.name for t in study.trials]
    assert len(states) == 5 and "FAIL" not in states, states
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, "no trial pruned"
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) >= 2
    absurd = [t for t in study.trials if t.params["train.lr"] == 1.0e-7]
    judged = [t for t in absurd if t.number > max(c.number for c in complete[:2])]
    assert judged and all(t.state.name == "PRUNED" and t.last_step == 1 for t in judged)
    assert all(t.last_step < 3 for t in pruned)  # stopped early: fewer epochs than asked
    assert best["trials"] == {"complete": len(complete), "pruned": len(pruned), "fail": 0}
    assert best["best_params"]["train.lr"] == 0.01
    assert study.trials[0].user_attrs["baseline"] and study.trials[0].params["train.lr"] == 0.01
    assert f"val_f1_macro {best['best_value']:.4f}" in out.stdout

    # MLflow: one parent with history, importances and the best params; every trial a child
    client = _client(root)
    parent = client.get_run(best["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {"figures/optimization_history.png", "figures/param_importances.png"}
    assert float(parent.data.tags["best.train.lr"]) == 0.01
    assert parent.data.metrics["best_val_f1_macro"] == pytest.approx(best["best_value"])
    history = client.get_metric_history(parent.info.run_id, "trial_value")
    assert sorted(m.step for m in history) == [
        t.number for t in study.trials if t.state.name == "COMPLETE"
    ]
    exp = client.get_experiment_by_name("imgcls")
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 5
    by_trial = {int(r.data.tags["tune.trial"]): r for r in children}
    for trial in study.trials:
        run = by_trial[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert float(run.data.params["train.lr"]) == trial.params["train.lr"]
        epochs = client.get_metric_history(run.info.run_id, "val_f1_macro")
        assert [m.step for m in epochs] == list(range(1, trial.last_step + 1))
        pruned_run = trial.state.name == "PRUNED"
        assert run.data.tags["tune.state"] == ("pruned" if pruned_run else "complete")
        assert run.info.status == ("KILLED" if pruned_run else "FINISHED")

    # DVC reproduces the best trial: the printed command, run for real, same val metric
    line = next(ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith("dvc exp"))
    assert line == best["dvc_command"]
    sh(*shlex.split(line), cwd=root)
    details = json.loads((root / "reports/train_details.json").read_text())
    assert details["val_f1_macro"] == pytest.approx(best["best_value"], abs=1e-6)
    assert load_params(root / "params.yaml").model.kwargs["dropout"] == pytest.approx(
        best["best_params"]["model.kwargs.dropout"], rel=1e-12
    )


@pytest.mark.slow
def test_tune_resumes_the_study_after_an_interruption(split_project: Path, tmp_path: Path) -> None:
    root = _copy(split_project, tmp_path / "copy")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tune"]["study_name"] = "resume-test"
    # Longer trials than the shared project's 3 epochs: a trial of 0.1 s could start and end
    # between two looks of the loop below on a loaded CI machine, and no Ctrl-C would land.
    params["train"]["epochs"] = 10
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    sh("imgcls", "tune", "--n-trials", "2", cwd=root)
    study = _study(root, "resume-test")
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    assert _finished(study) == 2

    # Ctrl-C in the middle of a later trial: the command says how to resume, nothing is lost
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(BIN / "imgcls"), "tune", "--n-trials", "6"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a runner started in the background ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _mid_trial(_study(root, "resume-test")):
            # Held, the command cannot finish that trial between this look and the signal:
            # look again while it is held, so Ctrl-C lands in a trial that is still running.
            proc.send_signal(signal.SIGSTOP)
            try:
                still = _mid_trial(_study(root, "resume-test"))
            except Exception:  # held inside a write: SQLite is locked, look again later
                still = False
            if still:
                proc.send_signal(signal.SIGINT)  # delivered on SIGCONT
                proc.send_signal(signal.SIGCONT)
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    interrupted = _study(root, "resume-test")
    done = _finished(interrupted)
    assert 3 <= done < 6
    failed = [t for t in interrupted.trials if t.state.name == "FAIL"]
    assert len(failed) == 1  # the trial that was running

    sh("imgcls", "tune", "--n-trials", "6", cwd=root)
    resumed = _study(root, "resume-test")
    assert _finished(resumed) == 6
    numbers = [t.number for t in resumed.trials]
    assert numbers == list(range(len(numbers)))  # one study, numbering continues
    assert resumed.user_attrs["mlflow_parent_run_id"] == parent_id  # one parent run
    client = _client(root)
    killed = client.get_run(failed[0].user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED"
    assert client.get_run(parent_id).info.status == "FINISHED"
    again = sh("imgcls", "tune", "--n-trials", "6", cwd=root)  # nothing left to do
    assert "0 finished in this run" in again.stdout
    assert len(_study(root, "resume-test").trials) == len(numbers)


@pytest.mark.slow
def test_dvc_grid_sweep_through_the_queue(split_project: Path, tmp_path: Path) -> None:
    root = _copy(split_project, tmp_path / "grid")
    sh(
        "dvc",
        "exp",
        "run",
        "--queue",
        "-S",
        "train.lr=0.001,0.01",
        "-S",
        "train.epochs=1",
        cwd=root,
    )
    assert sh("dvc", "queue", "status", cwd=root).stdout.count("Queued") == 2
    # the worker runs detached and keeps inherited pipes open: no capture here
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(
        ["dvc", "queue", "start", "--jobs", "1"],
        cwd=root,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = sh("dvc", "queue", "status", cwd=root).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2, status
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=root).stdout)
    exps = [e for row in shown for e in (row.get("experiments") or [])]
    got = {}
    for exp in exps:
        data = exp["revs"][0]["data"]
        lr = data["params"]["params.yaml"]["data"]["train"]["lr"]
        got[lr] = data["metrics"]["metrics/eval.json"]["data"]["accuracy"]
    assert set(got) == {0.001, 0.01}, shown
    assert all(0 < acc <= 1 for acc in got.values())
