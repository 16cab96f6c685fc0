"""The CI retrain flow as one function: detect change, pull, repro, gate, push, commit, report.

`.github/workflows/retrain.yml` runs exactly this (`imgcls retrain`), so the job can be run and
tested anywhere with any DVC remote, a local folder included. The order is what makes it safe:
nothing is pushed or committed unless `dvc repro` succeeded and the metric gate passed.

Why data changes need help: the `ingest` stage reads `data.source` (e.g. a `dvc add`-ed
`data/images/`), but that folder is not a dependency in `dvc.yaml` (the path is configurable),
so DVC alone would not rerun ingest when only the images change. The flow therefore compares
the `.dvc` files with the last commit that wrote `dvc.lock` and forces the data stage when one
changed; later stages then rerun only if the manifest changed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from imgcls.errors import ImgclsError
from imgcls.io import write_text

log = logging.getLogger(__name__)

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
    report: str = ""  # the Markdown report


# ----------------------------------------------------------------------------- redaction

REDACTED = "[redacted]"
# Environment variables whose values are secrets wherever they appear (GitHub masks secrets in
# the job log, but not in a pull-request comment, and not the derived forms a tool may print).
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|KEY|CREDENTIAL", re.IGNORECASE)
SECRET_URIS = ("MLFLOW_TRACKING_URI", "DVC_REMOTE_URL", "DVC_REMOTE_ENDPOINT_URL")
# Shorter values would redact ordinary words ("1", "true", "main"); no real key is that short.
MIN_SECRET_LEN = 6
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # a login in a URL: https://user:password@host, s3://KEY:SECRET@bucket, https://token@host
    (re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE), rf"\1{REDACTED}@"),
    # HTTP authorisation headers as curl / requests / git print them
    (
        re.compile(r"\b(authorization\s*[:=]\s*(?:(?:basic|bearer|token)\s+)?)\S+", re.IGNORECASE),
        rf"\1{REDACTED}",
    ),
    # credentials in query strings (pre-signed S3 / Azure SAS URLs, ?token=...)
    (
        re.compile(
            r"([?&](?:[\w-]*(?:token|signature|credential|secret|password|key)[\w-]*|sig)=)"
            r"[^&\s\"'<>)]+",
            re.IGNORECASE,
        ),
        rf"\1{REDACTED}",
    ),
    # name = value / name: value for anything named like a secret (config dumps, env listings)
    (
        re.compile(
            r"\b([\w.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key(?:[_-]id)?)"
            r"[\w.-]*[\"']?\s*[=:]\s*[\"']?)[^\s\"',;]+",
            re.IGNORECASE,
        ),
        rf"\1{REDACTED}",
    ),
    # well-known token shapes, whatever surrounds them
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{30,})"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),  # AWS access key ids
    (re.compile(r"\beyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,}"), REDACTED),  # JWTs (bearer tokens)
    (re.compile(r"\bdapi[0-9a-f]{32}\b"), REDACTED),  # Databricks tokens (MLflow on Databricks)
]


def _uri_forms(value: str) -> set[str]:
    """A secret URI and the forms tools print it in: without its login, origin only, host."""
    forms = {value, value.rstrip("/")}
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # not a URL (or a bad port): the value itself is all there is to hide
        return forms
    if parts.scheme and parts.hostname:
        netloc = parts.hostname + (f":{port}" if port else "")
        origin = f"{parts.scheme}://{netloc}"
        forms |= {origin, f"{origin}{parts.path}".rstrip("/"), netloc}
        if "." in parts.hostname:  # a server's name; `localhost` alone is no secret
            forms.add(parts.hostname)
    return forms


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values to hide: the tracking / remote URIs and every *TOKEN* *PASSWORD* *SECRET* *KEY*.

    Longest first, so that a URI is replaced whole before its host name alone is.
    """
    env = os.environ if env is None else env
    found: set[str] = set()
    for name, value in env.items():
        value = value.strip()
        if not value:
            continue
        if name in SECRET_URIS:
            found |= _uri_forms(value)
        elif SECRET_NAME.search(name):
            found.add(value)
    return sorted((v for v in found if len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` without credentials: secret env values, URL logins, auth headers, token shapes.

    Everything that leaves the runner (the report, the pull-request comment, the job summary)
    goes through this; see docs/security.md.
    """
    for value in secret_values(env):
        text = text.replace(value, REDACTED)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


# ----------------------------------------------------------------------------- processes


def tool_env() -> dict[str, str]:
    """Environment for git / dvc: this interpreter's bin folder first, so stages run `python`."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{path}", "DVC_NO_ANALYTICS": "1"}


def run(
    cmd: list[str], root: Path, *, check: bool = True, echo: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a git / dvc command in `root`; with `echo`, stream its output while capturing it."""
    log.debug("$ %s", " ".join(cmd))
    try:
        if not echo:
            proc = subprocess.run(
                cmd, cwd=root, env=tool_env(), capture_output=True, text=True, check=False
            )
        else:
            proc = _run_echoed(cmd, root)
    except FileNotFoundError:
        raise RetrainError(
            f"`{cmd[0]}` is not installed or not on PATH; install it (dvc comes with imgcls: "
            "`pip install -e .`) and run again"
        ) from None
    if check and proc.returncode != 0:
        detail = redact((proc.stderr or proc.stdout).strip())
        raise RetrainError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{detail}")
    return proc


def _run_echoed(cmd: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """Run with stdout+stderr merged, copied line by line (redacted) to our stdout (live logs)."""
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=root,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            # the job log of a public repository is public too, and GitHub masks only the exact
            # secret values, not the host of a URI or a login-less form of it
            sys.stdout.write(redact(line))
            sys.stdout.flush()
            lines.append(line)
    out = "".join(lines)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, out)


def git(root: Path, *args: str, check: bool = True) -> str:
    """Run git and return its stripped stdout."""
    return run(["git", *args], root, check=check).stdout.strip()


def git_paths(root: Path, *args: str) -> list[str]:
    """Paths a git listing command prints, NUL-separated (`-z`: no quoting of odd names)."""
    return [p for p in run(["git", *args[:1], "-z", *args[1:]], root).stdout.split("\0") if p]


def dvc(root: Path, *args: str, echo: bool = False) -> str:
    """Run dvc and return its output."""
    return run(["dvc", *args], root, echo=echo).stdout


# ----------------------------------------------------------------------------- detect


def check_repository(root: Path, cfg: RetrainConfig) -> None:
    """Fail fast (before any training) on a folder that is no git + DVC repository or no remote."""
    if run(["git", "rev-parse", "--git-dir"], root, check=False).returncode != 0:
        raise RetrainError(f"{root} is not a git repository; run `imgcls retrain` in the project")
    if not (root / ".dvc").is_dir():
        raise RetrainError(f"{root} has no .dvc folder; run `dvc init` once in the project root")
    if cfg.data_stage not in pipeline_stages(root):
        raise RetrainError(
            f"--data-stage {cfg.data_stage!r} is not a stage in dvc.yaml (stages: "
            f"{', '.join(pipeline_stages(root)) or 'none'}); name the stage that reads the data"
        )
    names = dvc_remotes(root)
    if cfg.remote and cfg.remote not in names:
        raise RetrainError(
            f"DVC remote {cfg.remote!r} is not configured (configured: "
            f"{', '.join(names) or 'none'}); add it with `dvc remote add {cfg.remote} <url>` "
            "or drop --remote"
        )
    if cfg.push and not cfg.remote and not dvc_default_remote(root):
        raise RetrainError(
            "no default DVC remote, so the results could not be pushed; set one with "
            "`dvc remote add -d storage /path/to/shared/folder` (or an s3:// URL, see "
            "docs/dvc.md), pass --remote NAME, or run with --no-push"
        )


def dvc_yaml_stages(root: Path) -> dict[str, Any]:
    """The `stages:` mapping of dvc.yaml."""
    path = root / "dvc.yaml"
    if not path.is_file():
        raise RetrainError(f"{path} does not exist; run `imgcls retrain` in the project root")
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}


def pipeline_stages(root: Path) -> list[str]:
    """Stage names in dvc.yaml."""
    return list(dvc_yaml_stages(root))


def dvc_remotes(root: Path) -> list[str]:
    """Names of the configured DVC remotes (`dvc remote list` prints `name<TAB>url` lines)."""
    return [line.split()[0] for line in dvc(root, "remote", "list").splitlines() if line.strip()]


def dvc_default_remote(root: Path) -> str:
    """The default remote's name, or "" when none is set."""
    proc = run(["dvc", "config", "core.remote"], root, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status --json`: outdated stages and `.dvc` files, keyed by name."""
    text = dvc(root, "status", "--json").strip()
    return json.loads(text) if text else {}


def data_outs_in_state(status: dict[str, Any], states: set[str]) -> list[str]:
    """Paths tracked by `.dvc` files whose `dvc status` state is one of `states`."""
    found = []
    for name, entries in status.items():
        if not name.endswith(".dvc"):
            continue
        for entry in entries:
            outs = entry.get("changed outs", {}) if isinstance(entry, dict) else {}
            found += [path for path, state in outs.items() if state in states]
    return sorted(found)


def stale_stages(status: dict[str, Any]) -> list[str]:
    """Pipeline stages (not `.dvc` files) that `dvc status` reports as out of date."""
    return sorted(name for name in status if not name.endswith(".dvc"))


def changed_data_files(root: Path) -> list[str]:
    """`.dvc` files changed since the last commit of dvc.lock (committed, staged or not)."""
    lock_commit = git(root, "log", "-1", "--format=%H", "--", LOCK_FILE, check=False)
    if lock_commit:
        changed = git_paths(root, "diff", "--name-only", lock_commit, "--", DVC_FILES)
    else:  # the pipeline never ran here: every tracked dataset is new to it
        changed = git_paths(root, "ls-files", "--", DVC_FILES)
    changed += git_paths(root, "ls-files", "--others", "--exclude-standard", "--", DVC_FILES)
    return sorted({p for p in changed if p and (root / p).is_file()})


# ----------------------------------------------------------------------------- repro


def ran_stages(output: str) -> list[str]:
    """Stage names in DVC's "Running stage 'X':" lines, in order."""
    names = []
    for line in output.splitlines():
        if line.startswith("Running stage '"):
            names.append(line.split("'")[1])
    return names


def reproduce(root: Path, force: list[str], ran: list[str]) -> None:
    """`dvc repro` (forcing the `force` stages first, alone); append the stages run to `ran`."""
    commands = [["dvc", "repro", "--single-item", "--force", stage] for stage in force]
    for cmd in [*commands, ["dvc", "repro"]]:
        proc = run(cmd, root, check=False, echo=True)
        ran += [s for s in ran_stages(proc.stdout) if s not in ran]  # a forced stage: once
        if proc.returncode != 0:
            tail = redact("\n".join(proc.stdout.strip().splitlines()[-REPRO_TAIL_LINES:]))
            raise RetrainError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}); nothing was pushed or "
                "committed, and the failed stage kept its previous outputs and dvc.lock entry. "
                f"Its last lines:\n{tail}"
            )


# ----------------------------------------------------------------------------- gate


def resolve_ref(root: Path, ref: str) -> str:
    """`ref`, or `origin/<ref>` when only that exists (CI checkouts have no local main)."""
    for candidate in (ref, f"origin/{ref}"):
        rev = f"{candidate}^{{commit}}"
        if run(["git", "rev-parse", "--verify", "--quiet", rev], root, check=False).returncode == 0:
            return candidate
    raise RetrainError(
        f"base ref {ref!r} not found (nor origin/{ref}); fetch it (`git fetch origin {ref}`; in "
        "GitHub Actions check out with `fetch-depth: 0`) or pass --base with a branch or commit"
    )


def read_metric(data: Any, metric: str, where: str) -> float:
    """The metric's value from parsed metrics JSON, with an error naming the file and key."""
    if not isinstance(data, dict) or metric not in data:
        keys = ", ".join(sorted(data)[:12]) if isinstance(data, dict) else "none"
        raise RetrainError(
            f"{where}: no key {metric!r} (keys: {keys}); pick the gate metric with --metric"
        )
    try:
        return float(data[metric])
    except (TypeError, ValueError):
        raise RetrainError(f"{where}: {metric!r} is {data[metric]!r}, not a number") from None


def baseline_metric(root: Path, base_ref: str, cfg: RetrainConfig) -> float | None:
    """The committed metric at `base_ref`, or None when that commit has no metrics file."""
    proc = run(["git", "show", f"{base_ref}:{cfg.metrics_file}"], root, check=False)
    if proc.returncode != 0:
        return None
    where = f"{cfg.metrics_file} at {base_ref}"
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise RetrainError(f"{where} is not valid JSON: {err}") from None
    return read_metric(data, cfg.metric, where)


def current_metric(root: Path, cfg: RetrainConfig) -> float:
    """The metric the pipeline just wrote."""
    path = root / cfg.metrics_file
    if not path.is_file():
        raise RetrainError(
            f"{cfg.metrics_file} does not exist after `dvc repro`; is --metrics-file the "
            "evaluate stage's metrics output in dvc.yaml?"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RetrainError(f"{cfg.metrics_file} is not valid JSON: {err}") from None
    return read_metric(data, cfg.metric, cfg.metrics_file)


def metric_gate(root: Path, base_ref: str, cfg: RetrainConfig) -> GateResult:
    """Compare the new metric with the base ref's committed one."""
    return GateResult(
        metric=cfg.metric,
        value=current_metric(root, cfg),
        baseline=baseline_metric(root, base_ref, cfg),
        max_drop=cfg.max_drop,
        base=base_ref,
    )


# ----------------------------------------------------------------------------- push + commit


def git_tracked_outputs(root: Path) -> list[str]:
    """Outputs declared `cache: false` in dvc.yaml: git versions them (metrics, plots, reports)."""
    found = []
    for stage in dvc_yaml_stages(root).values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []) or []:
                if isinstance(item, dict):
                    found += [p for p, opts in item.items() if (opts or {}).get("cache") is False]
    return found


def commit_paths(root: Path) -> list[str]:
    """dvc.lock, the git-tracked outputs and any .gitignore DVC touched, where they exist."""
    listed = ["ls-files", "--modified", "--others", "--exclude-standard", "--", "*.gitignore"]
    ignores = git_paths(root, *listed)
    paths = [LOCK_FILE, *git_tracked_outputs(root), *ignores]
    return [p for p in dict.fromkeys(paths) if (root / p).exists()]


def commit_results(root: Path, message: str) -> str | None:
    """Commit only dvc.lock + metrics (never other staged work); None when nothing changed."""
    paths = commit_paths(root)
    if not paths:
        return None
    git(root, "add", "--", *paths)
    if run(["git", "diff", "--cached", "--quiet", "--", *paths], root, check=False).returncode == 0:
        return None
    git(root, "commit", "--quiet", "-m", message, "--", *paths)
    return git(root, "rev-parse", "HEAD")


def commit_message(gate: GateResult, changed: list[str]) -> str:
    """The bot commit's message; `[skip ci]` so that it cannot trigger the workflow again."""
    what = f"data change in {', '.join(changed)}" if changed else "pipeline change"
    score = f"{gate.metric} {gate.value:.4f}"
    if gate.baseline is not None:
        score += f", was {gate.baseline:.4f}"
    return f"retrain: update dvc.lock and metrics after {what} ({score}) {SKIP_CI}"


# ----------------------------------------------------------------------------- report


def validation_summary(path: Path) -> str:
    """The title and summary paragraph of the validate stage's Markdown report."""
    if not path.is_file():
        return f"_No validation report at `{path.name}`._"
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            break
        lines.append(f"**{line[2:]}**" if line.startswith("# ") else line)
    return "\n".join(lines).strip()


def validation_file(root: Path, cfg: RetrainConfig) -> Path:
    """The validate stage's report, or its `-failed` twin when that one is newer (it failed)."""
    good = root / cfg.validation_report
    failed = good.with_name(f"{good.stem}-failed{good.suffix}")  # see pipeline/validate.py
    if failed.is_file() and (not good.is_file() or failed.stat().st_mtime > good.stat().st_mtime):
        return failed
    return good


def mlflow_link(path: Path, env: Mapping[str, str] | None = None) -> str:
    """A Markdown line naming the MLflow run recorded in models/run.json.

    A tracking *server's* URI is never written: it may hold a login and the report is posted as
    a pull-request comment. A link appears only when the public UI address is set in
    $IMGCLS_MLFLOW_UI_URL (in CI the repository variable MLFLOW_UI_URL).
    """
    env = os.environ if env is None else env
    if not path.is_file():
        return "_No MLflow run recorded (tracking disabled, or the train stage did not run)._"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return f"_`{path.name}` is not valid JSON._"
    run_id, uri = info.get("run_id"), str(info.get("tracking_uri") or "")
    if not run_id:
        return "_MLflow tracking was disabled for this run._"
    ui = env.get(UI_URL_ENV, "").strip()
    if ui.startswith(("http://", "https://")):
        # MLflow's UI routes `#/runs/<id>` straight to the run's page
        return f"[MLflow run `{run_id}`]({ui.rstrip('/')}/#/runs/{run_id})"
    if uri.startswith(("sqlite:", "file:", "/")):
        return (
            f"MLflow run `{run_id}` in `{uri}`, a store local to this machine (open it with "
            f"`mlflow ui --backend-store-uri {uri}`; set MLFLOW_TRACKING_URI to a shared server "
            f"and {UI_URL_ENV} to its public address to get a link here)"
        )
    return (
        f"MLflow run `{run_id}` on the tracking server (its address is not shown here; set "
        f"{UI_URL_ENV} to the UI's public address to get a link)"
    )


def metrics_diff(root: Path, base_ref: str) -> str:
    """`dvc metrics diff --md` between the base ref and the workspace."""
    proc = run(["dvc", "metrics", "diff", "--md", base_ref], root, check=False)
    if proc.returncode != 0:
        return f"_`dvc metrics diff` failed: {(proc.stderr or proc.stdout).strip()}_"
    return proc.stdout.strip() or "_No metric changed._"


def build_report(
    root: Path, cfg: RetrainConfig, result: RetrainResult, base_ref: str | None, error: str = ""
) -> str:
    """The Markdown job summary: verdict, what ran, metric diff, validation, figures, MLflow."""
    gate = result.gate
    ok = not error and gate is not None and gate.passed
    lines = [f"# Retrain {'passed' if ok else 'failed'} {'✅' if ok else '❌'}", ""]
    if error:
        lines += ["```", error.strip(), "```", ""]
    changed = ", ".join(f"`{p}`" for p in result.changed_data) or "none"
    ran = ", ".join(f"`{s}`" for s in result.ran_stages) or "none (everything was up to date)"
    lines += [f"- Tracked data changed since the last dvc.lock: {changed}", f"- Stages run: {ran}"]
    if gate is not None:
        lines.append(f"- Metric gate: {gate.describe()}")
    pushed = "yes" if result.pushed else "no"
    lines += [f"- Pushed to the DVC remote: {pushed}", f"- Commit: {result.commit or 'none'}", ""]
    if base_ref is not None and (root / cfg.metrics_file).is_file():
        # GitHub renders <details> in job summaries and comments: the table can be long
        lines += [f"## Metrics vs `{base_ref}`", "", "<details><summary>dvc metrics diff</summary>"]
        lines += ["", metrics_diff(root, base_ref), "", "</details>", ""]
    lines += ["## Data validation", "", validation_summary(validation_file(root, cfg)), ""]
    image = root / cfg.confusion_image
    where = f"`{cfg.confusion_image}`" if image.is_file() else "_not produced_"
    lines += ["## Confusion matrix", "", f"{where} (in the workflow's `retrain-report` artifact)"]
    lines += ["", "## MLflow", "", mlflow_link(root / cfg.run_file), ""]
    # every part above can quote tool output (DVC errors, metrics diff, file names): redact once
    return redact("\n".join(lines))


def write_report(text: str, path: Path) -> None:
    """Write the report file and append it to GitHub's job summary when running in Actions."""
    text = redact(text)  # idempotent; also holds for a report not made by build_report
    write_text(path, text)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:  # GitHub's file: append, never replace
            fh.write(text + "\n")


# ----------------------------------------------------------------------------- the flow


def retrain(cfg: RetrainConfig) -> RetrainResult:
    """Run the whole flow and write the report; raise GateFailed / RetrainError on failure."""
    root = cfg.root
    result = RetrainResult()
    base_ref: str | None = None
    try:
        check_repository(root, cfg)
        base_ref = resolve_ref(root, cfg.base)
        detect_and_pull(root, cfg, result)
        reproduce(root, [cfg.data_stage] if result.changed_data else [], result.ran_stages)
        result.gate = metric_gate(root, base_ref, cfg)
        print(f"metric gate: {result.gate.describe()}", flush=True)
        if not result.gate.passed:
            raise GateFailed(
                f"metric gate: {result.gate.describe()}. Nothing was pushed or committed; "
                f"look at what changed in the data ({cfg.validation_report}) before raising "
                "--max-drop"
            )
        if cfg.push:
            dvc(root, "push", *remote_args(cfg), echo=True)
            result.pushed = True
        if cfg.commit:
            result.commit = commit_results(root, commit_message(result.gate, result.changed_data))
    except RetrainError as err:
        result.report = build_report(root, cfg, result, base_ref, error=str(err))
        write_report(result.report, cfg.report)
        raise
    result.report = build_report(root, cfg, result, base_ref)
    write_report(result.report, cfg.report)
    return result


def remote_args(cfg: RetrainConfig) -> list[str]:
    """`-r NAME` when a remote was named, else nothing (DVC's default remote)."""
    return ["-r", cfg.remote] if cfg.remote else []


def detect_and_pull(root: Path, cfg: RetrainConfig, result: RetrainResult) -> None:
    """Find changed data, restore the committed outputs from the remote, find outdated stages."""
    if unrecorded := data_outs_in_state(dvc_status(root), {"modified"}):
        raise RetrainError(
            f"{', '.join(unrecorded)} changed in the workspace but the change is not recorded; "
            f"run `dvc add {' '.join(unrecorded)}` (and commit the .dvc file) before retraining"
        )
    result.changed_data = changed_data_files(root)
    if cfg.remote or dvc_default_remote(root):
        # --allow-missing: outputs of a dvc.lock never pushed (first run, failed run) are
        # simply rebuilt by `dvc repro`; missing *input* data is caught just below
        dvc(root, "pull", "--allow-missing", *remote_args(cfg), echo=True)
    else:
        print("pull: no DVC remote configured; using the workspace as it is", flush=True)
    status = dvc_status(root)
    if missing := data_outs_in_state(status, {"deleted", "not in cache"}):
        raise RetrainError(
            f"{', '.join(missing)} is tracked by DVC but neither in the workspace nor on the "
            "remote; run `dvc push` where the data was added (with the same remote configured)"
        )
    result.stale_stages = stale_stages(status)
    print(_detect_line(result), flush=True)


def _detect_line(result: RetrainResult) -> str:
    """What the change detection found, for the log."""
    if not result.changed_data and not result.stale_stages:
        return "detect: nothing changed; every stage is up to date"
    parts = []
    if result.changed_data:
        parts.append(f"tracked data changed ({', '.join(result.changed_data)})")
    if result.stale_stages:
        parts.append(f"outdated stages: {', '.join(result.stale_stages)}")
    return "detect: " + "; ".join(parts)
