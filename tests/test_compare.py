"""`imgcls compare`: the diff on synthetic runs (fast), and two real `dvc exp run`s (slow)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from _project import make_project, sh
from imgcls.compare import CompareError, RunData, compare
from imgcls.compare.diff import changed_predictions, confusion_difference
from imgcls.compare.figures import agg_pyplot, plot_confusion_difference
from imgcls.compare.report import markdown, terminal_table
from imgcls.retrain.versus import compare_with_champion


def _confusions(k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two confusion matrices of the same test set (equal row sums), B a bit better."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, size=(k, k)) + np.diag(rng.integers(10, 20, size=k))
    b = a.copy()
    for i in range(k):  # move some of each row's mistakes onto the diagonal, some away
        j = (i + 1) % k
        moved = min(b[i, j], 2)
        b[i, j] -= moved
        b[i, i] += moved
    b[0, 0] -= 3
    b[0, k - 1] += 3
    return a, b


@pytest.mark.parametrize("k", [3, 50, 150])
def test_difference_heatmap_is_centred_and_readable(k: int) -> None:
    a, b = _confusions(k)
    diff = confusion_difference(a, b)
    assert diff is not None and (diff == b - a).all()
    assert (diff.sum(axis=1) == 0).all()  # same test set: every true class keeps its images
    classes = [f"class_with_a_long_name_{i}" for i in range(k)]
    fig = plot_confusion_difference(diff, classes, "B − A")
    ax = fig.axes[0]
    image = ax.images[0]
    assert image.norm.vmin == -image.norm.vmax == -np.abs(diff).max()  # centred on 0
    assert image.cmap.name == "RdBu_r"
    texts = [t.get_text() for t in ax.texts]
    if k == 3:  # every non-zero cell annotated with its signed count
        assert sorted(texts) == sorted(f"{v:+d}" for v in diff[diff != 0])
    else:  # colours only, and every label drawn is clear of its neighbours
        assert texts == []
        labels = [t for t in ax.get_yticklabels() if t.get_text()]
        assert len(labels) == k if k <= 50 else 10 <= len(labels) < k  # thinned when many
        fig.canvas.draw()
        boxes = sorted((bb.y0, bb.y1) for bb in (t.get_window_extent() for t in labels))
        assert all(hi <= lo + 0.5 for (_, hi), (lo, _) in itertools.pairwise(boxes))
    agg_pyplot().close(fig)
    assert confusion_difference(a, b[:-1]) is None  # different classes: no difference drawn


def _run(ref: str, preds: pd.DataFrame, classes: list[str], digest: str = "d1") -> RunData:
    """A RunData as load_run builds it, from a predictions table."""
    p, r, f, s = precision_recall_fscore_support(
        preds["label"], preds["predicted"], labels=classes, zero_division=0
    )
    details = {"accuracy": float((preds["label"] == preds["predicted"]).mean())}
    for i, c in enumerate(classes):
        details.update({f"precision_{c}": p[i], f"recall_{c}": r[i], f"f1_{c}": f[i]})
        details[f"support_{c}"] = int(s[i])
    cm = confusion_matrix(preds["label"], preds["predicted"], labels=classes)
    return RunData(
        ref=ref,
        run_id=ref * 4,
        name=ref,
        params={"train.epochs": "1" if ref == "a" else "2", "train.lr": "0.003"},
        tags={"data.splits_sha256": digest},
        details=details,
        classes=classes,
        confusion=cm,
        predictions=preds.assign(confidence=0.9),
    )


def test_fixed_broken_deltas_and_params_on_synthetic_runs() -> None:
    labels = ["x", "x", "y", "y", "z", "z"]
    a = pd.DataFrame({"path": list("123456"), "label": labels, "predicted": list("xyyzzx")})
    b = pd.DataFrame({"path": list("123456"), "label": labels, "predicted": list("xxyyyz")})
    comp = compare(_run("a", a, list("xyz")), _run("b", b, list("xyz")))
    assert comp.fixed["path"].tolist() == ["2", "4", "6"]
    assert comp.broken["path"].tolist() == ["5"]
    assert comp.params.to_dict("records") == [{"param": "train.epochs", "a": "1", "b": "2"}]
    assert (comp.diff == comp.b.confusion - comp.a.confusion).all()
    row = comp.per_class.set_index("class")
    assert row.loc["z", "recall_delta"] == pytest.approx(0.5 - 0.5)
    assert row.loc["x", "recall_delta"] == pytest.approx(1.0 - 0.5)
    assert comp.per_class["f1_delta"].abs().is_monotonic_decreasing  # largest change first
    text = terminal_table(comp)
    assert "fixed by B: 3   broken by B: 1" in text and "train.epochs: 1 -> 2" in text
    assert "## Fixed by B (3)" in markdown(comp)


def test_different_test_sets_are_refused_unless_forced() -> None:
    a = pd.DataFrame({"path": ["1", "2"], "label": ["x", "y"], "predicted": ["x", "x"]})
    b = pd.DataFrame({"path": ["1", "3"], "label": ["x", "y"], "predicted": ["y", "y"]})
    run_a, run_b = _run("a", a, ["x", "y"], "d1"), _run("b", b, ["x", "y"], "d2")
    with pytest.raises(CompareError, match=r"not tested on the same images.*1 in common.*--force"):
        compare(run_a, run_b)
    forced = compare(run_a, run_b, force=True)
    assert forced.same_test_set.startswith("forced") and forced.broken["path"].tolist() == ["1"]
    # a different splits.csv whose test rows are the same still compares
    same = compare(run_a, _run("b", a.assign(predicted="y"), ["x", "y"], "d2"))
    assert "same 2 test images" in same.same_test_set
    assert changed_predictions(run_a.predictions, run_a.predictions).empty


def _runs_by_experiment(root: Path) -> dict[str, str]:
    """DVC experiment name -> MLflow run id, from the project's store."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imgcls")
    return {
        r.data.tags["dvc.exp_name"]: r.info.run_id for r in client.search_runs([exp.experiment_id])
    }


@pytest.mark.slow
@pytest.mark.xdist_group("e2e")
def test_compare_two_dvc_experiments_agrees_with_their_metrics(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", train={"epochs": 1})
    sh("dvc", "repro", "split", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@l", "commit", "-qm", "data", cwd=root)
    eval_json = {}
    for name, epochs in (("exp1", 1), ("exp2", 3)):
        sh("dvc", "exp", "run", "-n", name, "-S", f"train.epochs={epochs}", cwd=root)
        eval_json[name] = json.loads((root / "metrics/eval.json").read_text())
    runs = _runs_by_experiment(root)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    # the per-epoch curve has one point per epoch: evaluate's val numbers have their own keys
    history = client.get_metric_history(runs["exp2"], "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert "valsplit_accuracy" in client.get_run(runs["exp2"]).data.metrics

    out = sh("imgcls", "compare", "exp1", "exp2", cwd=root).stdout
    folder = root / "reports/compare/exp1_vs_exp2"
    for name in ("compare.md", "confusion_diff.png", "fixed.png", "broken.png", "per_class.csv"):
        assert (folder / name).stat().st_size > 100, name
    assert "train.epochs: 1 -> 3" in out

    # recompute everything from the two runs' logged prediction tables
    preds = {}
    for name, run_id in runs.items():
        dl = client.download_artifacts(run_id, "evaluation/predictions_test.csv", str(tmp_path))
        preds[name] = pd.read_csv(dl, keep_default_na=False, dtype=str)
        shutil.move(dl, tmp_path / f"{name}.csv")
        acc = (preds[name]["label"] == preds[name]["predicted"]).mean()
        assert acc == pytest.approx(eval_json[name]["accuracy"])  # predictions = eval.json
    a, b = preds["exp1"], preds["exp2"]
    assert (a["path"] == b["path"]).all()
    fixed = set(a.path[(a.predicted != a.label) & (b.predicted == b.label)])
    broken = set(a.path[(a.predicted == a.label) & (b.predicted != b.label)])
    changed = pd.read_csv(folder / "changed.csv", keep_default_na=False, dtype=str)
    assert set(changed.path[changed.change == "fixed"]) == fixed
    assert set(changed.path[changed.change == "broken"]) == broken
    assert f"fixed by B: {len(fixed)}   broken by B: {len(broken)}" in out
    assert fixed or broken  # 1 vs 3 epochs: some test image changed its prediction

    classes = sorted(set(a.label))
    want = confusion_matrix(b.label, b.predicted, labels=classes) - confusion_matrix(
        a.label, a.predicted, labels=classes
    )
    got = pd.read_csv(folder / "confusion_diff.csv", index_col="true")
    assert got.index.astype(str).tolist() == classes and (got.to_numpy() == want).all()

    per_class = pd.read_csv(folder / "per_class.csv").assign(cls=lambda f: f["class"].astype(str))
    per_class = per_class.set_index("cls")
    for name, side in (("exp1", "a"), ("exp2", "b")):
        frame = preds[name]
        _, _, f1, _ = precision_recall_fscore_support(
            frame.label, frame.predicted, labels=classes, zero_division=0
        )
        assert per_class.loc[classes, f"f1_{side}"].to_numpy() == pytest.approx(f1, abs=1e-9)
        assert np.mean(f1) == pytest.approx(eval_json[name]["f1_macro"])
    delta = (per_class["f1_b"] - per_class["f1_a"]).to_numpy()
    assert per_class["f1_delta"].to_numpy() == pytest.approx(delta)
    assert (
        f"| f1_macro | {eval_json['exp1']['f1_macro']:.4f} | {eval_json['exp2']['f1_macro']:.4f}"
        in (folder / "compare.md").read_text()
    )

    # logged to B's run; and models:/ / run id references resolve to the same runs
    logged = {f.path for f in client.list_artifacts(runs["exp2"], "compare/exp1_vs_exp2")}
    assert "compare/exp1_vs_exp2/compare.md" in logged
    root_files = {f.path for f in client.list_artifacts(runs["exp2"]) if not f.is_dir}
    assert {"confusion_matrix.png", "pr_curves.png", "misclassified.png"} <= root_files
    client.create_registered_model("imgcls-test")
    version = client.create_model_version("imgcls-test", "runs:/x/model", run_id=runs["exp1"])
    client.set_registered_model_alias("imgcls-test", "champion", version.version)
    for ref in (runs["exp1"], "models:/imgcls-test@champion", "models:/imgcls-test/1"):
        again = sh("imgcls", "compare", ref, runs["exp2"], "--no-log", cwd=root).stdout
        assert f"fixed by B: {len(fixed)}   broken by B: {len(broken)}" in again, ref
    missing = sh("imgcls", "compare", "exp1", "nope", cwd=root, check=False)
    assert missing.returncode == 1 and "'nope' is neither a run id" in missing.stderr
    assert "exp1, exp2" in missing.stderr

    # the retrain report: the registered candidate (exp2, the workspace's record) vs the champion
    record = root / "models/logged_models.json"
    assert json.loads(record.read_text())["registered_model"]["name"] == "imgcls"
    out_dir = tmp_path / "versus"
    assert "Not compared with `models:/imgcls@champion`" in compare_with_champion(
        record, root, out_dir
    )  # no champion yet: one line, never an error
    (exp1_version,) = client.search_model_versions(f"run_id='{runs['exp1']}' and name='imgcls'")
    client.set_registered_model_alias("imgcls", "champion", exp1_version.version)
    text = compare_with_champion(record, root, out_dir)
    assert "# models:/imgcls@champion vs models:/imgcls/" in text
    assert f"| f1_macro | {eval_json['exp1']['f1_macro']:.4f} |" in text
    assert (out_dir / "confusion_diff.png").is_file()


def test_retrain_comparison_without_a_registered_candidate_is_one_line(tmp_path: Path) -> None:
    """No record, or tracking was off: the report says why, the job goes on."""
    record = tmp_path / "logged_models.json"
    assert compare_with_champion(record, tmp_path, tmp_path / "out") == (
        "_Not compared: logged_models.json is missing: nothing was registered._"
    )
    record.write_text(json.dumps({"run_id": None, "registered_model": None}))
    assert "tracking off" in compare_with_champion(record, tmp_path, tmp_path / "out")
