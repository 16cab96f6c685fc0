"""The real MLflow UI: headless Chromium shows two `dvc exp run -S` runs side by side.

Needs the Debian packages `chromium` and `chromium-driver`. Without them the test is skipped with
a reason on a developer's machine, but *fails* where `CI=true` (GitHub Actions sets it): CI is
meant to run it (`.ci/run` installs both), and a skip there would pass silently forever.
Set IMGCLS_UPDATE_SCREENSHOT=1 to also refresh docs/img/mlflow-compare.png from this run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from _ci import require_tool
from _datasets import REPO
from _mlflow_server import Server, run
from _project import make_project

INSTALL = "apt-get install -y chromium chromium-driver (Debian / Ubuntu; .ci/run does it as root)"


def missing_browser() -> str | None:
    """What is missing for the UI test, or None."""
    missing = []
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        missing.append("chromium")
    if not shutil.which("chromedriver"):
        missing.append("chromedriver")
    return " and ".join(missing) or None


def _screenshot_module():
    """scripts/screenshot_compare.py (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "screenshot_compare", REPO / "scripts/screenshot_compare.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def metric_columns(page_text: str, metric: str) -> list[float]:
    """The values the compare view's Metrics table shows for `metric`, one per run column.

    The table renders every metric name, then each row's values run by run.
    """
    section = page_text[page_text.rindex("\nMetrics\n") + len("\nMetrics\n") :]
    section = section[: section.index("\nArtifacts")]
    lines = [line.strip() for line in section.splitlines()]
    lines = [line for line in lines if line and line != "Show diff only"]
    names = [line for line in lines if not _is_number(line)]
    values = [float(line) for line in lines if _is_number(line)]
    per_run = len(values) // len(names)
    assert per_run * len(names) == len(values), (names, values)
    i = names.index(metric)
    return values[i * per_run : (i + 1) * per_run]


@pytest.mark.parametrize("ci", ["true", "", "false"])
def test_missing_browser_fails_in_ci_and_skips_elsewhere(
    ci: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine with neither installed
    assert missing_browser() == "chromium and chromedriver"
    env = {"CI": ci}
    # nothing missing: neither skip nor fail, whatever CI says
    require_tool(None, INSTALL, env)
    expected = pytest.fail.Exception if ci == "true" else pytest.skip.Exception
    with pytest.raises(expected, match="chromedriver.*apt-get install -y chromium chromium-driver"):
        require_tool("chromedriver", INSTALL, env)


@pytest.fixture
def browser() -> None:
    """Chromium + chromedriver, checked before the (slow) server and projects are set up."""
    require_tool(missing_browser(), INSTALL)


@pytest.mark.slow
@pytest.mark.xdist_group("e2e")
def test_compare_view_shows_two_experiments_side_by_side(
    browser: None, tmp_path: Path, mlflow_server: Server
) -> None:
    shots = _screenshot_module()
    root = make_project(tmp_path / "proj", train={"epochs": 1})
    run("dvc", "repro", "split", cwd=root, uri=mlflow_server.url)
    run("git", "add", "-A", cwd=root, uri=None)
    run("git", "commit", "-qm", "data", cwd=root, uri=None)
    for name, epochs in (("one-epoch", 1), ("two-epochs", 2)):
        run(
            "dvc", "exp", "run", "-n", name, "-S", f"train.epochs={epochs}",
            cwd=root, uri=mlflow_server.url,
        )  # fmt: skip

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("imgcls")
    runs = {r.data.tags["dvc.exp_name"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"one-epoch", "two-epochs"}
    assert all(r.info.run_name == name for name, r in runs.items())  # named after the experiment
    ids = [runs["one-epoch"].info.run_id, runs["two-epochs"].info.run_id]

    out = tmp_path / "mlflow-compare.png"
    text = shots.capture_compare(
        mlflow_server.url,
        ids,
        [exp.experiment_id],
        out,
        expect=["one-epoch", "two-epochs", "test_accuracy", "train.epochs"],
    )
    # the metrics table: one column per run, in the order the runs were given
    one, two = (runs[name].data.metrics["test_accuracy"] for name in ("one-epoch", "two-epochs"))
    shown = metric_columns(text, "test_accuracy")
    assert shown == pytest.approx([one, two], abs=5e-3)  # the UI rounds to 3 significant digits

    with Image.open(out) as img:
        assert img.size[0] >= 1200 and img.size[1] >= 900
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 10  # a rendered page, not a blank or single-colour image
    if os.environ.get("IMGCLS_UPDATE_SCREENSHOT"):
        target = REPO / "docs/img/mlflow-compare.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, target)
