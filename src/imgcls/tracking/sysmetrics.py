"""System metrics (CPU, memory, disk, network; GPU with `nvidia-ml-py`) for a run, via MLflow.

MLflow's :class:`~mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` reads the
whole machine and logs `system/cpu_utilization_percentage`,
`system/system_memory_usage_megabytes`, `system/gpu_0_utilization_percentage`, ... to the run,
one step per sample. It runs in the processes that already talk to MLflow (the train stage's
low-priority logger, the evaluate stage's model publisher), never in the training process.
`tracking.system_metrics: false` turns it off.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("imgcls.tracking")

# One sample every 10 s (MLflow's default): each costs a few psutil reads and one `log_batch`,
# well under 1 % of a core. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SAMPLING_INTERVAL_S = 10.0


class SystemMetrics:
    """Samples the machine into a run from a daemon thread until :meth:`stop`.

    MLflow's monitor classes read the machine (CPU, disk, network, GPU) and log the samples,
    but not its sampling loop: that loop drops the samples of its last, unfinished interval
    (a run shorter than the interval logged nothing), and its first CPU sample is always 0
    (psutil measures CPU utilisation per calling thread, since that thread's previous call).
    Here one thread takes every sample, the first one interval after it started, the last when
    :meth:`stop` is called.
    """

    def __init__(self, monitor: Any) -> None:
        self._monitor = monitor
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._sample, name="imgcls-system-metrics", daemon=True
        )
        self._thread.start()

    def _sample(self) -> None:
        """The thread: one sample per interval, and one when stopped, each logged at once."""
        self._monitor.collect_metrics()  # starts this thread's CPU interval (reads 0): dropped
        for m in self._monitor.monitors:
            m.clear_metrics()
        while True:
            stopped = self._stopping.wait(self._monitor.sampling_interval)
            try:
                self._monitor.collect_metrics()
                if metrics := self._monitor.aggregate_metrics():
                    self._monitor.publish_metrics(metrics)  # clears the samples
                self._monitor.mlflow_logger.flush()
            except Exception as err:  # a dropped store: the run's other logging reports it
                log.debug("system metrics: sample not logged: %s", err)
            if stopped:
                return

    def stop(self) -> None:
        """Take and log the last sample, then end the thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            thread.join(timeout=60)  # one psutil read and one log_batch


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
        return SystemMetrics(monitor)  # its own loop, not `monitor.start()`: see the class
    except Exception as err:  # best-effort, like every other logging call
        log.warning("system metrics are not logged: %s: %s", type(err).__name__, err)
        return None
