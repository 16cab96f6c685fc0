"""Resumable, checksum-verified HTTPS downloads into a cache folder.

A download is written to `<name>.part`, resumed with an HTTP Range request after an interruption,
verified against the expected SHA-256 and only then renamed to its final name. A mismatch deletes
the bad file; nothing downstream is touched before verification succeeds.
"""

from __future__ import annotations

import http.client
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from imgcls.data.imageinfo import sha256_file
from imgcls.errors import ImgclsError

log = logging.getLogger(__name__)

# Plain http is allowed only to this machine, so tests can use a local server; anything that
# crosses a network must be https.
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
CHUNK = 1 << 16
TIMEOUT_S = 60.0


class DownloadError(ImgclsError):
    """A URL that could not be fetched (offline, refused, interrupted, HTTP error)."""


class ChecksumError(DownloadError):
    """A downloaded file whose SHA-256 is not the expected one."""


def check_url(url: str) -> None:
    """Refuse anything but https (http only to localhost) with a clear message."""
    parsed = urlparse(url)
    if parsed.scheme == "https" and parsed.hostname:
        return
    if parsed.scheme == "http" and parsed.hostname in LOCAL_HOSTS:
        return
    raise DownloadError(
        f"{url}: only https:// URLs are downloaded (plain http only from localhost), so that what "
        "arrives is what the server sent. Use the https address, or download the file yourself "
        "and point data.source at it (`path: ...`)."
    )


def url_filename(url: str) -> str:
    """The last path component of a URL, used as the cached file's name."""
    name = unquote(Path(urlparse(url).path).name)
    if not name or name in (".", ".."):
        raise DownloadError(f"{url}: the URL does not end in a file name; give the full file URL")
    return name


def _manual_hint(url: str, dest: Path, sha256: str | None) -> str:
    """How to supply a file by hand when this machine cannot download it."""
    digest = f" (its sha256 must be {sha256})" if sha256 else ""
    return (
        f"To supply it by hand, download {url} on a machine that can reach it and copy it to "
        f"{dest}{digest}; then run ingest again. It is verified, not downloaded, when present."
    )


def _digest_sidecar(path: Path) -> Path:
    """File that remembers a verified download's digest, keyed by its size and mtime."""
    return path.with_name(path.name + ".sha256")


def _known_digest(path: Path) -> str:
    """SHA-256 of `path`, from its sidecar when size and mtime are unchanged (saves re-hashing)."""
    st = path.stat()
    side = _digest_sidecar(path)
    try:
        digest, size, mtime = side.read_text(encoding="utf-8").split()
        if int(size) == st.st_size and int(mtime) == st.st_mtime_ns:
            return digest
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    side.write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n", encoding="utf-8")
    return digest


def _verify(url: str, path: Path, sha256: str | None, dest: Path) -> None:
    """Raise if `path` does not have the expected digest (deleting it on a mismatch)."""
    got = _known_digest(path)
    if sha256 is None:
        raise DownloadError(
            f"{url}: no sha256 given, so the download cannot be verified. The file saved at "
            f"{dest} has sha256 {got}; if you trust it, add `sha256: {got}` to this source in "
            "params.yaml and run ingest again (the file will not be downloaded again)."
        )
    if got.lower() != sha256.lower():
        path.unlink(missing_ok=True)
        _digest_sidecar(path).unlink(missing_ok=True)
        raise ChecksumError(
            f"{url}: sha256 mismatch: expected {sha256.lower()}, got {got}. The bad file "
            f"({path}) was deleted and earlier outputs were left untouched. Run again to "
            "download it afresh; if it keeps failing, the file on the server changed: check the "
            "source and update `sha256` in params.yaml only if you trust the new file."
        )


def _open(url: str, offset: int) -> http.client.HTTPResponse:
    """Send the GET (with a Range header when resuming) and return the response."""
    headers = {"User-Agent": "imgcls-ingest"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def _fetch(url: str, part: Path, *, progress: bool) -> None:
    """Download `url` into `part`, appending to what is already there when the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the part file is already whole
            return
        raise
    with resp:
        if offset and resp.status != 206:  # server ignored the Range header: start over
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            open(part, "ab" if offset else "wb") as fh,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=url_filename(url),
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            received = offset
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received < total:
            raise http.client.IncompleteRead(b"", total - received)


def download(url: str, sha256: str | None, dest: Path, *, progress: bool = True) -> Path:
    """Make `dest` hold the verified contents of `url`, downloading or resuming as needed."""
    check_url(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # downloaded earlier or supplied by hand: verify, never re-download
        _verify(url, dest, sha256, dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    resumed_from = part.stat().st_size if part.exists() else 0
    if resumed_from:
        log.info("resuming %s from byte %d", url, resumed_from)
    try:
        _fetch(url, part, progress=progress)
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"{url}: the server answered HTTP {err.code} {err.reason}. Check the URL. "
            + _manual_hint(url, dest, sha256)
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        got = part.stat().st_size if part.exists() else 0
        if got > resumed_from:
            raise DownloadError(
                f"{url}: the download was interrupted after {got:,} bytes ({reason}). Run ingest "
                f"again to resume it from {part}. " + _manual_hint(url, dest, sha256)
            ) from None
        raise DownloadError(
            f"{url}: could not reach the URL ({reason}); are you offline? "
            + _manual_hint(url, dest, sha256)
        ) from None
    if sha256 is None:  # keep the file under its final name so that pinning it needs no refetch
        os.replace(part, dest)
        _verify(url, dest, sha256, dest)
    _verify(url, part, sha256, dest)
    os.replace(part, dest)
    side = _digest_sidecar(part)
    if side.exists():
        os.replace(side, _digest_sidecar(dest))
        _known_digest(dest)  # mtime is unchanged by rename; refresh the sidecar if not
    return dest
