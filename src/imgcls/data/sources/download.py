"""Resumable, checksum-verified HTTPS downloads into a cache folder.

A download is written to `<name>.part`, resumed with an HTTP Range request after an interruption,
verified against the expected SHA-256 and only then renamed to its final name. A mismatch deletes
the bad file; nothing downstream is touched before verification succeeds. A redirect is followed
only to https (plain http only from localhost to localhost), and a download that announces or
grows past `max_bytes` (`data.max_download_bytes`) is stopped and its partial file deleted.
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

from imgcls.config import DataConfig, SourceSpec
from imgcls.data.imageinfo import sha256_file
from imgcls.data.sources.archive import extract_archive, is_archive
from imgcls.data.sources.common import DOWNLOADS, SourceError, checked_name, under
from imgcls.errors import ImgclsError
from imgcls.io import (
    DiskFullError,
    disk_full_message,
    ensure_free_space,
    explain_disk_full,
    is_disk_full,
)

log = logging.getLogger(__name__)

# Plain http is allowed only to this machine, so tests can use a local server; anything that
# crosses a network must be https.
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
CHUNK = 1 << 16
TIMEOUT_S = 60.0
MAX_DOWNLOAD_BYTES = 4 * 1024**3  # the default of data.max_download_bytes


class DownloadError(ImgclsError):
    """A URL that could not be fetched (offline, refused, interrupted, HTTP error)."""


class UnreachableError(DownloadError):
    """A URL that could not be reached at all (offline?): the file must be supplied by hand."""

    def __init__(self, message: str, url: str, dest: Path, sha256: str | None) -> None:
        super().__init__(message)
        self.url, self.dest, self.sha256 = url, dest, sha256


def unreachable_message(errors: list[UnreachableError]) -> str:
    """One message naming every file to supply by hand, with where it goes and its digest."""
    lines = [
        f"could not reach {len(errors)} URLs; are you offline? To supply the files by hand, "
        "download each on a machine that can reach it and copy it to the path given (verified, "
        "not downloaded, when present); then run ingest again:"
    ]
    for err in errors:
        digest = f" (sha256 {err.sha256})" if err.sha256 else ""
        lines.append(f"  - {err.url} -> {err.dest}{digest}")
    return "\n".join(lines)


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


def check_redirect(url: str, new_url: str) -> None:
    """Refuse a redirect to anything but https (http only from localhost to localhost)."""
    new = urlparse(new_url)
    if new.scheme == "https" and new.hostname:
        return
    old = urlparse(url)
    local = old.scheme == "http" and old.hostname in LOCAL_HOSTS and new.hostname in LOCAL_HOSTS
    if new.scheme == "http" and local:
        return
    raise DownloadError(
        f"{url}: the server redirected to {new_url}, which was refused: a download is only "
        "redirected to https:// (plain http only from localhost to localhost), so that an https "
        "source never turns into an unencrypted one. If that address is right, put it in "
        "data.source yourself."
    )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, with every new location checked by :func:`check_redirect`."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        """Check the new location before following it."""
        check_redirect(req.full_url, newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def url_filename(url: str) -> str:
    """The last path component of a URL, percent-decoded (callers must check it is plain)."""
    name = unquote(urlparse(url).path.rsplit("/", 1)[-1])
    if not name:
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
    with explain_disk_full(side):
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
    request = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener(_CheckedRedirects)  # per call: proxies from the env now
    return opener.open(request, timeout=TIMEOUT_S)  # type: ignore[return-value]


def _too_big(url: str, part: Path, size: int, limit: int, *, announced: bool) -> DownloadError:
    """Delete the partial file and build the error for a download above the size cap."""
    part.unlink(missing_ok=True)
    what = f"announces {size:,} bytes" if announced else f"grew past {size:,} bytes"
    return DownloadError(
        f"{url}: the download {what}, more than data.max_download_bytes = {limit:,}; it was "
        "stopped and the partial file deleted. If you trust this source and expect a file this "
        "big, raise data.max_download_bytes in params.yaml."
    )


def _disk_full(part: Path, needed: int | None) -> DiskFullError:
    """Delete the partial file (it fills the disk) and build the disk-full error."""
    part.unlink(missing_ok=True)
    return DiskFullError(disk_full_message(part, needed) + " The partial download was deleted.")


def _fetch(url: str, part: Path, *, progress: bool, max_bytes: int) -> None:
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
        if total is not None and total > max_bytes:
            raise _too_big(url, part, total, max_bytes, announced=True)
        if total is not None:
            try:
                ensure_free_space(part, total - offset)
            except DiskFullError:
                raise _disk_full(part, total - offset) from None
        try:
            received = _stream(resp, part, offset, total, max_bytes, progress)
        except OSError as err:
            if is_disk_full(err):
                raise _disk_full(part, None if total is None else total - offset) from None
            raise
        if received > max_bytes:
            raise _too_big(url, part, max_bytes, max_bytes, announced=False)
        if total is not None and received < total:
            raise http.client.IncompleteRead(b"", total - received)


def _stream(
    resp: http.client.HTTPResponse,
    part: Path,
    offset: int,
    total: int | None,
    max_bytes: int,
    progress: bool,
) -> int:
    """Append the response body to `part`, stopping one byte past `max_bytes`; bytes held."""
    # O_NOFOLLOW: a link planted at the .part path is an error, never a way to write elsewhere.
    mode = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if offset else os.O_TRUNC)
    with (
        os.fdopen(os.open(part, mode, 0o666), "ab" if offset else "wb") as fh,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
            file=sys.stderr,
        ) as bar,
    ):
        received = offset
        while received <= max_bytes and (chunk := resp.read(min(CHUNK, max_bytes + 1 - received))):
            fh.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


def download(
    url: str,
    sha256: str | None,
    dest: Path,
    *,
    progress: bool = True,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Path:
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
        _fetch(url, part, progress=progress, max_bytes=max_bytes)
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
        raise UnreachableError(
            f"{url}: could not reach the URL ({reason}); are you offline? "
            + _manual_hint(url, dest, sha256),
            url,
            dest,
            sha256,
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


def url_file_name(spec: SourceSpec) -> str:
    """The checked, percent-decoded file name at the end of a url source's URL."""
    return checked_name(spec, url_filename(str(spec.url)), "the file name taken from its URL")


def url_source(spec: SourceSpec, cfg: DataConfig, raw_dir: Path, progress: bool) -> Path:
    """Download (or resume, or reuse) a verified archive, then extract it into data/raw/<name>/."""
    url = str(spec.url)
    fname = url_file_name(spec)
    if not is_archive(fname):
        raise SourceError(
            f"data.source {url}: only archives (.zip, .tar, .tar.gz, .tgz) can be downloaded as a "
            "source; pack single files into an archive"
        )
    dest = under(raw_dir / DOWNLOADS, fname, spec)
    archive = download(url, spec.sha256, dest, progress=progress, max_bytes=cfg.max_download_bytes)
    target = under(raw_dir, str(spec.name), spec)
    extract_archive(archive, target, cfg.max_archive_bytes)
    return target
