"""Promote a registered model version to `champion` unless it is worse than the current one.

The evaluate stage registers each evaluated model as a new version with the alias `challenger`
(imgcls.inference.publish); :func:`promote` moves the alias `champion` to a version, which
`imgcls predict --model models:/<name>@champion` and `mlflow models serve -m
models:/<name>@champion` then use. MLflow aliases replace the deprecated registry stages: an
alias names one version at a time, so setting it on a new version moves it.

The comparison reads the gate metric from each version's run (the evaluate stage logs the test
metrics there, e.g. `test_f1_macro`), so a version is compared on the numbers of the data it was
tested on. `imgcls promote` and `imgcls retrain` both call :func:`promote`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imgcls.errors import ImgclsError
from imgcls.inference.publish import CHALLENGER, CHAMPION

DEFAULT_METRIC = "test_f1_macro"  # test macro-F1: every head logs it (retrain's default gate too)


class PromotionError(ImgclsError):
    """The registry cannot be read, or the version / run / metric asked for does not exist."""


class PromotionRefused(PromotionError):
    """The candidate is worse than the champion on the gate metric (`--force` overrides)."""


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` did: which version is champion now, and the numbers compared."""

    name: str
    version: int
    run_id: str
    metric: str
    value: float | None
    previous: int | None  # the champion before (None: there was none)
    previous_value: float | None
    forced: bool = False

    @property
    def changed(self) -> bool:
        """False when the version already was the champion."""
        return self.previous != self.version

    def describe(self) -> str:
        """One line for the terminal and the retrain report."""
        uri = f"models:/{self.name}@{CHAMPION}"
        score = f"{self.metric} {_fmt(self.value)}"
        if not self.changed:
            return f"{uri} already is version {self.version} ({score}); nothing to do"
        if self.previous is None:
            was = "there was no champion yet"
        else:
            was = f"was version {self.previous} ({self.metric} {_fmt(self.previous_value)})"
        forced = " (forced)" if self.forced else ""
        return f"{uri} -> version {self.version} ({score}){forced}; {was}"


def _fmt(value: float | None) -> str:
    """A metric value, or `n/a` when the run has none."""
    return "n/a" if value is None else f"{value:.4f}"


def client_for(uri: str) -> Any:
    """An MlflowClient whose tracking and registry store are both `uri`."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def _missing(err: Exception) -> bool:
    """True for MLflow's "does not exist" errors (version, alias, model, run)."""
    return (
        getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"
        or "not found" in str(err).lower()
    )


def _store_error(what: str, err: Exception) -> PromotionError:
    """A store failure as one line that names what was being read."""
    first = (str(err).splitlines() or [""])[0][:300]
    return PromotionError(
        f"cannot read {what} from the MLflow store ({type(err).__name__}: {first}); check "
        "MLFLOW_TRACKING_URI (or tracking.uri in params.yaml)"
    )


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version `alias` points at, or None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception as err:
        if _missing(err):
            return None
        raise _store_error(f"{name}@{alias}", err) from None


def candidate_version(
    client: Any, name: str, version: int | None = None, run_id: str | None = None
) -> Any:
    """The version to promote: `version`, else the newest one of `run_id`, else the challenger."""
    if version is not None:
        try:
            return client.get_model_version(name, str(version))
        except Exception as err:
            if _missing(err):
                raise PromotionError(
                    f"registered model {name!r} has no version {version}; list them with "
                    f"`mlflow models` or the MLflow UI's Models tab (or drop --version to promote "
                    f"the {CHALLENGER})"
                ) from None
            raise _store_error(f"{name} version {version}", err) from None
    if run_id is not None:
        try:
            found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        except Exception as err:
            raise _store_error(f"the versions of {name}", err) from None
        if not found:
            raise PromotionError(
                f"run {run_id} registered no version of {name!r}; was it evaluated with "
                "tracking.register_model set (and tracking on)? Give --version N instead"
            )
        return max(found, key=lambda v: int(v.version))
    found = alias_version(client, name, CHALLENGER)
    if found is None:
        raise PromotionError(
            f"{name!r} has no {CHALLENGER} (no evaluated version registered under that name); "
            "run the pipeline (`dvc repro`) with tracking on and tracking.register_model: "
            f"{name}, or give --version N / --run RUN_ID"
        )
    return found


def run_metric(client: Any, run_id: str, metric: str) -> tuple[float | None, list[str]]:
    """The metric of a version's run (None if the run has no such key), and the run's keys."""
    try:
        metrics = client.get_run(run_id).data.metrics
    except Exception as err:
        raise _store_error(f"run {run_id}", err) from None
    value = metrics.get(metric)
    return (None if value is None else float(value)), sorted(metrics)


def promote(
    uri: str,
    name: str,
    *,
    version: int | None = None,
    run_id: str | None = None,
    metric: str = DEFAULT_METRIC,
    force: bool = False,
    max_drop: float = 0.0,
) -> Promotion:
    """Move `champion` of `name` to the candidate unless its `metric` is worse than the champion's.

    Worse means more than `max_drop` below (retrain passes its gate's margin). No champion yet:
    the candidate is promoted. Raises PromotionRefused (with both numbers) unless `force`.
    """
    client = client_for(uri)
    candidate = candidate_version(client, name, version, run_id)
    value, keys = run_metric(client, candidate.run_id, metric)
    if value is None and not force:
        test_keys = ", ".join([k for k in keys if k.startswith("test_")][:12]) or "none"
        raise PromotionError(
            f"run {candidate.run_id} (version {candidate.version} of {name!r}) has no metric "
            f"{metric!r} (its test metrics: {test_keys}); pick one with --metric"
        )
    current = alias_version(client, name, CHAMPION)
    previous = None if current is None else int(current.version)
    before = None
    if current is not None and previous != int(candidate.version):
        before, _ = run_metric(client, current.run_id, metric)
        refuse = _refusal(name, candidate, value, current, before, metric, max_drop)
        if refuse and not force:
            raise PromotionRefused(refuse)
    elif current is not None:
        before = value
    result = Promotion(
        name, int(candidate.version), candidate.run_id, metric, value, previous, before, force
    )
    if result.changed:
        _set_champion(client, result)
    return result


def _refusal(
    name: str,
    candidate: Any,
    value: float | None,
    current: Any,
    before: float | None,
    metric: str,
    max_drop: float,
) -> str:
    """Why the candidate may not replace the champion ("" when it may)."""
    if before is None:
        return (
            f"cannot compare: the {CHAMPION} (version {current.version}, run {current.run_id}) "
            f"has no metric {metric!r}; pick another --metric, or --force to promote version "
            f"{candidate.version} anyway"
        )
    if value is not None and value >= before - max_drop - 1e-12:  # float noise is no drop
        return ""
    allowed = f" (allowed drop {max_drop:.4f})" if max_drop else ""
    return (
        f"refusing to promote version {candidate.version} of {name!r}: {metric} "
        f"{_fmt(value)} is worse than the {CHAMPION}'s (version {current.version}) "
        f"{_fmt(before)}{allowed}; the {CHAMPION} stays version {current.version}. Use --force "
        "to promote it anyway"
    )


def _set_champion(client: Any, result: Promotion) -> None:
    """Point `champion` at the version and tag the version with what it was compared with."""
    version = str(result.version)
    try:
        client.set_registered_model_alias(result.name, CHAMPION, version)
        tags = {
            "imgcls.promoted_over": str(result.previous) if result.previous else "none",
            "imgcls.promotion_metric": f"{result.metric}={_fmt(result.value)}",
            "imgcls.promotion_forced": str(result.forced).lower(),
        }
        for key, value in tags.items():
            client.set_model_version_tag(result.name, version, key, value)
    except Exception as err:
        raise _store_error(f"{result.name} (setting {CHAMPION})", err) from None
