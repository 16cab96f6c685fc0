"""System metrics (CPU, memory, disk, network; GPU with `nvidia-ml-py`) for a run, via MLflow.

MLflow's :class:`~mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` samples the
whole machine from a thread and logs `system/cpu_utilization_percentage`,
`system/system_memory_usage_megabytes`, `system/gpu_0_utilization_percentage`, ... to the run,
one step per sample. It runs in the processes that already talk to MLflow at a low priority
(the train stage's logger, the evaluate stage's model publisher), never in the training process.
`tracking.system_metrics: false` turns it off.

MLflow's monitor drops the samples of its last, unfinished interval on `finish()`, so a run
shorter than the interval logged nothing: :meth:`SystemMetrics.stop` logs that last sample.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("imgcls.tracking")

# One sample every 10 s (MLflow's default): each costs a few psutil reads, a `get_run` and a
# `log_batch`, well under 1 % of a core. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SAMPLING_INTERVAL_S = 10.0


def prime_cpu_percent() -> None:
    """Start psutil's CPU-utilisation interval, so the first sample is a real average, not 0."""
    try:
        import psutil

        psutil.cpu_percent()
    except ImportError:  # reported once by `start_system_metrics`
        pass


class SystemMetrics:
    """A started monitor for one run; :meth:`stop` logs the last sample and ends its thread."""

    def __init__(self, monitor: Any) -> None:
        self._monitor = monitor

    def stop(self) -> None:
        """Stop sampling and log what the last (partial) interval measured (best-effort)."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()  # ends the thread (within one `get_run`) and flushes its batch
            monitor.collect_metrics()  # the interval since its last sample
            if metrics := monitor.aggregate_metrics():
                monitor.publish_metrics(metrics)
            monitor.mlflow_logger.flush()
        except Exception as err:  # a dropped store: the run's other logging reports it
            log.debug("system metrics: last sample not logged: %s", err)


def start_system_metrics(uri: str, run_id: str, *, resume: bool = False) -> SystemMetrics | None:
    """Sample the machine into run `run_id` until :meth:`SystemMetrics.stop` (None if it can't).

    `resume` continues the steps of an earlier attempt's samples (a resumed training, or the
    evaluate stage after train) instead of restarting at step 0.
    """
    # "Started monitoring system metrics." and its siblings at INFO would clutter every stage log.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        import psutil  # noqa: F401  (MLflow's CPU monitor needs it)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as err:
        log.warning(
            "system metrics are not logged (%s); install psutil, or set "
            "tracking.system_metrics: false in params.yaml",
            err,
        )
        return None
    try:
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=SAMPLING_INTERVAL_S,
            resume_logging=resume,
            tracking_uri=uri,
        )
        monitor.start()
    except Exception as err:  # best-effort, like every other logging call
        log.warning("system metrics are not logged: %s: %s", type(err).__name__, err)
        return None
    return SystemMetrics(monitor)
