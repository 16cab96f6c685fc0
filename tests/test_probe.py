"""The start-up probe that fills in `train.precision / channels_last / cpu_threads: auto`."""

import json
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from _trainrun import run_train, train_project
from imgcls.config import TrainConfig
from imgcls.models.bundle import Preprocess
from imgcls.training.probe import (
    Candidate,
    ProbeResult,
    apply_choice,
    candidates,
    choose,
    cpu_cores,
    min_train_s,
    probe_budget,
    resolve_auto,
)
from imgcls.training.setup import make_optimizer

CPU = torch.device("cpu")
ENV = "IMGCLS_PROBE_MIN_TRAIN_S"


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8, 3),
    )


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=gen)
    return x, torch.arange(n) % 3


def _resolve(cfg: TrainConfig, model: nn.Module, cache: Path | None, **kw):
    return resolve_auto(
        cfg,
        model,
        Preprocess([0.5], [0.25]),
        nn.CrossEntropyLoss(),
        _batch(),
        CPU,
        arch="test-cnn",
        cache_dir=cache,
        make_optimizer=lambda m: make_optimizer(m, cfg),
        **kw,
    )


def test_candidates_cover_the_auto_settings_default_first() -> None:
    auto = TrainConfig(precision="auto", channels_last="auto", cpu_threads="auto")
    cands = candidates(auto, CPU, _cnn())
    n = cpu_cores()
    assert cands[0] == Candidate("fp32", True, n)  # the default: fp32, NHWC, one per core
    assert {c.precision for c in cands} == {"fp32", "bf16"}
    assert {c.channels_last for c in cands} == {False, True}
    assert {c.threads for c in cands} == ({n, 1} if n > 1 else {1})
    # fixed settings keep their value; NHWC is not tried on a model without convolutions
    fixed = TrainConfig(precision="bf16", channels_last="auto", cpu_threads=1)
    assert candidates(fixed, CPU, nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) == [
        Candidate("bf16", False, 1)
    ]


def test_choose_keeps_the_default_unless_clearly_faster() -> None:
    a, b = Candidate("fp32", False, 2), Candidate("bf16", True, 2)
    assert choose([a, b], {a.label: 100.0, b.label: 97.0}) == a  # 3 %: within the margin
    assert choose([a, b], {a.label: 100.0, b.label: 80.0}) == b
    assert choose([a, b], {b.label: 80.0}) == b  # the default rejected
    assert choose([a, b], {}) == a
    assert probe_budget(10.0) == 0.5 and probe_budget(1e5) == 2.5


def test_probe_measures_caches_and_leaves_torch_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "0")  # a 20-step training is measured all the same
    cfg = TrainConfig(precision="auto", channels_last="auto", cpu_threads="auto", epochs=2)
    model = _cnn()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    threads, rng = torch.get_num_threads(), torch.get_rng_state()

    resolved, result = _resolve(cfg, model, tmp_path / "probe", train_steps=20)

    assert result is not None and result.source == "measured"
    assert resolved.precision in ("fp32", "bf16") and isinstance(resolved.channels_last, bool)
    assert isinstance(resolved.cpu_threads, int)
    assert result.choice.label in result.step_ms  # the choice was timed
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert "ms/step" in result.line() and result.choice.label in result.line()
    assert result.params()["probe.precision"] == resolved.precision
    files = list((tmp_path / "probe").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["choice"]["label"]

    again, cached = _resolve(cfg, model, tmp_path / "probe", train_steps=20)
    assert cached is not None and cached.source == "cache" and cached.choice == result.choice
    assert again == resolved
    _resolve(cfg, nn.Sequential(_cnn(), nn.Linear(3, 3)), tmp_path / "probe")
    assert len(list((tmp_path / "probe").glob("*.json"))) == 2  # another model, another key
    assert ProbeResult.from_dict(result.to_dict()) == result


def test_a_short_training_keeps_the_default_unmeasured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One timed step of the default estimates the training; under the limit nothing else runs."""
    monkeypatch.delenv(ENV, raising=False)
    cfg = TrainConfig(precision="auto", channels_last="auto", cpu_threads="auto")
    resolved, result = _resolve(cfg, _cnn(), tmp_path / "probe", train_steps=20)
    assert result is not None and result.source == "skipped"
    assert result.choice == candidates(cfg, CPU, _cnn())[0]  # fp32 / NHWC / one per core
    assert list(result.step_ms) == [result.choice.label]  # the default alone was timed
    assert result.estimated_train_s is not None and result.estimated_train_s < min_train_s()
    assert "too short to repay" in result.line() and result.params()["probe.source"] == "skipped"
    assert resolved.precision == "fp32" and resolved.channels_last is True
    assert not (tmp_path / "probe").exists()  # not cached: a longer training still measures
    # a long training (by its step count) is measured; so is any with the limit at 0
    _, long = _resolve(cfg, _cnn(), None, train_steps=10**7)
    assert long is not None and long.source == "measured" and len(long.step_ms) > 1
    monkeypatch.setenv(ENV, "0")
    assert _resolve(cfg, _cnn(), None, train_steps=20)[1].source == "measured"
    monkeypatch.setenv(ENV, "soon")
    assert min_train_s() == 30.0  # not a number: the default limit, with a warning


def test_nothing_is_measured_when_deterministic_or_fixed(tmp_path: Path) -> None:
    auto = TrainConfig(precision="auto", channels_last="auto", cpu_threads="auto")
    same, result = _resolve(auto.model_copy(update={"deterministic": True}), _cnn(), tmp_path)
    assert result is None and same.precision == "auto"
    fixed = TrainConfig(precision="fp32", channels_last=False, cpu_threads=1)
    assert _resolve(fixed, _cnn(), tmp_path) == (fixed, None)
    assert not list(tmp_path.iterdir())
    assert apply_choice(fixed, Candidate("bf16", True, 2)) == fixed  # fixed values stay


class _Cancels(nn.Module):
    """Logits from a near-cancellation that bf16 cannot represent (1.004 rounds to 1.0)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(144, 1, bias=False)
        self.b = nn.Linear(1, 3)
        with torch.no_grad():
            self.a.weight.zero_()
            self.a.weight[0, 0], self.a.weight[0, 1] = 1.004, -1.0
            self.b.weight.copy_(torch.tensor([[0.0], [50.0], [-50.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x.flatten(1)))


def test_numerically_unsafe_precision_is_rejected() -> None:
    cfg = TrainConfig(precision="auto", channels_last=False, cpu_threads=1)
    x = torch.full((16, 1, 12, 12), 250, dtype=torch.uint8)
    resolved, result = resolve_auto(
        cfg,
        _Cancels(),
        Preprocess([0.0], [1 / 255]),  # raw pixel values in: the cancellation is visible
        nn.CrossEntropyLoss(),
        (x, torch.zeros(16, dtype=torch.long)),
        CPU,
        arch="cancels",
        cache_dir=None,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0),
    )
    assert result is not None and resolved.precision == "fp32"
    assert "bf16/nchw/1t" in result.rejected and "vs fp32" in result.rejected["bf16/nchw/1t"]


def test_train_stage_logs_probe_and_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage: probe choice in the run's params, every part's seconds in details + run."""
    monkeypatch.setenv(ENV, "0")  # the stage inherits it: this tiny training is measured
    db = tmp_path / "mlflow.db"
    train_project(
        tmp_path,
        {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}},
        {
            "epochs": 2,
            "batch_size": 16,
            "deterministic": False,
            "precision": "auto",
            "channels_last": "auto",
            "cpu_threads": "auto",
        },
        [],
        per_class=20,
        tracking={"enabled": True, "uri": f"sqlite:///{db}"},
    )
    proc = run_train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train settings probe (measured" in proc.stderr
    details = json.loads((tmp_path / "reports/train_details.json").read_text())
    timing = details["timing"]
    parts = ["startup", "imports", "data", "probe", "train", "val", "checkpoint", "model_save"]
    assert all(timing[f"{p}_s"] >= 0 for p in parts), timing
    assert timing["train_s"] > 0 and [e["epoch"] for e in timing["epochs"]] == [1, 2]
    assert abs(sum(e["train_s"] for e in timing["epochs"]) - timing["train_s"]) < 0.01
    assert details["probe"]["source"] == "measured"
    # the DVC metric holds the stage's parts (not each epoch's), the same figures, summing up
    headline = json.loads((tmp_path / "metrics/train.json").read_text())
    assert headline["timing"] == {k: v for k, v in timing.items() if k != "epochs"}
    parts_sum = sum(v for k, v in headline["timing"].items() if k != "total_s")
    assert headline["timing"]["total_s"] == pytest.approx(parts_sum, abs=0.01)
    with sqlite3.connect(db) as con:
        params = dict(con.execute("select key, value from params").fetchall())
        metrics = {k for (k,) in con.execute("select key from metrics")}
    assert params["probe.precision"] == details["probe"]["choice"]["precision"]
    assert params["probe.source"] == "measured"
    assert {"time/train_s", "time/probe_s", "time/imports_s", "time/total_s"} <= metrics
    assert (tmp_path / "data/cache/probe").is_dir()  # the next run reads it

    (tmp_path / "models/checkpoints/last.pt").unlink()
    proc = run_train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train settings probe (cache" in proc.stderr


@pytest.mark.slow
def test_torchrun_ranks_take_rank_zeros_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun rank 0 probes once and every rank trains with its choice."""
    monkeypatch.setenv(ENV, "0")
    train_project(
        tmp_path,
        {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}},
        {"epochs": 2, "batch_size": 16, "deterministic": False, "precision": "auto"},
        [],
        per_class=20,
    )
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone")
    proc = run_train(tmp_path, *launcher, "--nproc_per_node=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("train settings probe (measured") == 1  # rank 0, once
    details = json.loads((tmp_path / "reports/train_details.json").read_text())
    assert details["probe"]["choice"]["precision"] in ("fp32", "bf16")
    assert len(list((tmp_path / "data/cache/probe").glob("*.json"))) == 1
