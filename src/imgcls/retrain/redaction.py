"""Secrets out of everything that leaves the runner: the report, PR comment, job summary, logs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

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
