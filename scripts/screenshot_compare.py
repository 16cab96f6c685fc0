"""Screenshot the MLflow UI's compare view of two (or more) runs with headless Chromium.

    python scripts/screenshot_compare.py --tracking-uri http://127.0.0.1:5000 \\
        --runs RUN_ID_1 RUN_ID_2 --out docs/img/mlflow-compare.png

Without `--runs` it takes the two newest finished runs of `--experiment`. Uses the Debian
`chromium` package (never a downloaded browser); only 127.0.0.1 / localhost servers are opened.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
]


class ScreenshotError(RuntimeError):
    """Chromium is missing or did not produce the screenshot."""


def find_chromium() -> str | None:
    """Path of the system Chromium, or None."""
    return next((p for name in CHROMIUM_NAMES if (p := shutil.which(name))), None)


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The MLflow UI's compare-runs page for these runs."""
    runs = quote(json.dumps(run_ids, separators=(",", ":")))
    exps = quote(json.dumps(experiment_ids, separators=(",", ":")))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}"


def newest_runs(base: str, experiment: str, n: int = 2) -> tuple[list[str], list[str]]:
    """Ids of the `n` newest finished runs of an experiment, and the experiment id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(base)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ScreenshotError(f"no experiment {experiment!r} at {base}")
    runs = client.search_runs(
        [exp.experiment_id],
        "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=n,
    )
    if len(runs) < n:
        raise ScreenshotError(f"experiment {experiment!r} has {len(runs)} finished runs, need {n}")
    return [r.info.run_id for r in runs], [exp.experiment_id]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """Headless Chromium driven by the system `chromedriver` over plain W3C WebDriver HTTP calls.

    (No selenium dependency: the handful of WebDriver endpoints needed here are one `requests`
    call each.) Use as a context manager: the driver and browser always terminate.
    """

    def __init__(self, size: tuple[int, int] = (1600, 1800)) -> None:
        self.size = size
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = ""

    def __enter__(self) -> Browser:
        exe, driver = find_chromium(), shutil.which("chromedriver")
        if exe is None or driver is None:
            raise ScreenshotError(
                "Chromium / chromedriver not found: apt-get install -y chromium chromium-driver"
            )
        self.profile = tempfile.TemporaryDirectory(prefix="imgcls-chromium-")
        self.proc = subprocess.Popen(
            [driver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
            args = [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile.name}"]
            args.append(f"--window-size={self.size[0]},{self.size[1]}")
            caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": exe, "args": args}}
            reply = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
            self.session = reply["sessionId"]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.session:
                self._call("DELETE", f"/session/{self.session}", timeout=20)
        except Exception:  # the browser may already be gone; the driver is stopped below anyway
            pass
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.profile.cleanup()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._call("GET", "/status", timeout=2).get("ready"):
                    return
            except Exception:
                time.sleep(0.2)
        raise ScreenshotError("chromedriver did not start")

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        import requests

        resp = requests.request(method, self.base + path, json=body, timeout=timeout)
        value = resp.json().get("value")
        if resp.status_code >= 400:
            raise ScreenshotError(f"WebDriver {path}: {value}")
        return value

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def open(self, url: str) -> None:
        """Navigate and wait for the page load event."""
        self._call("POST", self._s("/url"), {"url": url}, timeout=120)

    def js(self, script: str, *args: Any) -> Any:
        """Run JavaScript in the page and return its result."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def wait_for_text(self, texts: list[str], timeout: float = 60) -> str:
        """Poll the page until every string in `texts` is visible; return the page text."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.js("return document.body ? document.body.innerText : '';") or ""
            if all(t in text for t in texts):
                return text
            time.sleep(0.5)
        missing = [t for t in texts if t not in text]
        raise ScreenshotError(f"the page never showed {missing}")

    def click(self, css: str) -> bool:
        """Click the first element matching a CSS selector; False if there is none."""
        return bool(
            self.js(
                "const e = document.querySelector(arguments[0]);"
                "if (e) { e.click(); return true; } return false;",
                css,
            )
        )

    def screenshot(self, out: Path) -> Path:
        """Write the visible viewport as a PNG (atomically)."""
        png = base64.b64decode(self._call("GET", self._s("/screenshot")))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(png)
        tmp.replace(out)  # a half-written PNG never looks like a result
        return out


def capture_compare(
    base: str, run_ids: list[str], experiment_ids: list[str], out: Path, expect: list[str]
) -> str:
    """Open the compare view, tidy it for a readable shot, save it; return the page text.

    `expect`: strings (run names, metric names) the page must show before the shot is taken.
    """
    with Browser() as browser:
        browser.open(compare_url(base, run_ids, experiment_ids))
        browser.wait_for_text(["Run details", "Metrics", *expect])
        browser.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
        browser.click('button[aria-label="Parameters - Show diff only"]')
        # fold the plots away so that run details, the differing params and the metrics fit
        browser.js(
            "for (const e of document.querySelectorAll('[role=button], div')) {"
            "  if (e.childElementCount <= 2 && e.innerText === 'Visualizations') {"
            "    e.click(); break; } }"
        )
        time.sleep(1.0)  # let React re-render after the clicks
        text = browser.wait_for_text(expect)
        browser.screenshot(out)
    return text


def main() -> None:
    """Parse arguments, pick the runs and write the screenshot."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tracking-uri", default="http://127.0.0.1:5000")
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--experiment", default="imgcls")
    ap.add_argument("--out", default="docs/img/mlflow-compare.png", type=Path)
    args = ap.parse_args()
    host = urlparse(args.tracking_uri).hostname
    if host not in {"127.0.0.1", "localhost"}:
        sys.exit(f"refusing to open {args.tracking_uri}: only local servers are screenshotted")
    if args.runs:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(args.tracking_uri)
        run_ids = args.runs
        exp_ids = sorted({client.get_run(r).info.experiment_id for r in run_ids})
    else:
        run_ids, exp_ids = newest_runs(args.tracking_uri, args.experiment)
    capture_compare(args.tracking_uri, run_ids, exp_ids, args.out, expect=["test_accuracy"])
    print(args.out)


if __name__ == "__main__":
    main()
