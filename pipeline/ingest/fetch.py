"""Download a dataset's image URLs into its canonical image layout (stdlib only).

MRHP ships URLs, not pictures: users crawl them. `fetch_images` does that with bounded
concurrency, exponential backoff on transient errors (connection errors, timeouts, truncated
bodies, HTTP 5xx and 429; never on other 4xx), and resume: a file already at its final path
counts as complete and is skipped, because a download only reaches that path by an atomic
rename of a `.part` file whose length matched Content-Length and which decoded as an image.
Every URL that could not be fetched gets one JSON line in the failures file, and the run goes on.
"""
from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from PIL import Image

from pipeline.records import DatasetRecords

log = logging.getLogger(__name__)

FAILURES_FILE = "fetch_failures.jsonl"
PART_SUFFIX = ".part"
USER_AGENT = "mrhp-fetch/0.1 (research; multimodal review helpfulness image crawler)"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchConfig:
    """How images are downloaded."""

    concurrency: int = 8  # downloads in flight at once
    retries: int = 3  # further attempts after the first, on transient errors only
    timeout: float = 30.0  # seconds for connecting and for each read
    backoff: float = 1.0  # seconds before the first retry; doubles with each retry
    backoff_max: float = 60.0  # cap on one wait (also caps a server's Retry-After)
    max_bytes: int = 64 << 20  # refuse bodies larger than this (bytes)
    user_agent: str = USER_AGENT  # sent with every request
    verify_image: bool = True  # decode-check with PIL before the file is kept

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.retries < 0:
            raise ValueError(f"retries must be at least 0, got {self.retries}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.backoff < 0 or self.backoff_max < 0:
            raise ValueError(f"backoff and backoff_max must be >= 0, got {self.backoff}, {self.backoff_max}")


@dataclass(frozen=True)
class FetchJob:
    """One URL and where it goes: `path` is relative to the image root, posix separators."""

    url: str
    path: str


@dataclass(frozen=True)
class FetchResult:
    url: str
    path: str
    status: Literal["downloaded", "skipped", "failed"]
    attempts: int = 0  # HTTP requests made (0 for skipped)
    reason: str | None = None  # why it failed
    http_status: int | None = None  # last HTTP status seen, if any
    bytes: int = 0  # size of the kept file


@dataclass
class FetchSummary:
    downloaded: int = 0
    skipped: int = 0
    failed: int = 0
    failures_path: Path | None = None  # JSON lines, one per failed URL (None: no file written)
    results: list[FetchResult] = field(default_factory=list)  # failures, or all with keep_results

    def add(self, r: FetchResult, keep: bool = True) -> None:
        if keep or r.status == "failed":
            self.results.append(r)
        if r.status == "downloaded":
            self.downloaded += 1
        elif r.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1


class _Transient(Exception):
    """A failure worth retrying (network trouble, 5xx, 429, truncated body)."""

    def __init__(self, reason: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status
        self.retry_after = retry_after


class _Permanent(Exception):
    """A failure that another attempt will not fix (404, not an image, too large)."""

    def __init__(self, reason: str, http_status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status


def dataset_jobs(records: DatasetRecords) -> tuple[list[FetchJob], int]:
    """Fetch jobs for every product and review image with a URL, one per distinct path.

    Returns (jobs, refs_without_url). When two refs share a path the first URL wins.
    """
    seen: dict[str, str] = {}
    no_url = 0
    refs = [ref for p in records.products.values() for ref in p.images]
    refs += [ref for r in records.reviews for ref in r.images]
    for ref in refs:
        if not ref.url:
            no_url += 1
            continue
        if ref.path in seen:
            if seen[ref.path] != ref.url:
                log.warning("image %s has two URLs (%s, %s): keeping the first", ref.path, seen[ref.path], ref.url)
            continue
        seen[ref.path] = ref.url
    return [FetchJob(url=u, path=p) for p, u in seen.items()], no_url


def target_path(image_root: Path, rel: str) -> Path:
    """Absolute target of a relative image path; ValueError if it would leave the image root."""
    pp = PurePosixPath(rel)
    if not rel or pp.is_absolute() or ".." in pp.parts or "\\" in rel:
        raise ValueError(f"image path {rel!r} is not a relative path inside the image root")
    root = image_root.resolve()
    full = (root / Path(*pp.parts)).resolve()
    if root not in full.parents:
        raise ValueError(f"image path {rel!r} resolves to {full}, outside the image root {root}")
    return full


def fetch_images(
    jobs: Iterable[FetchJob],
    image_root: str | Path,
    config: FetchConfig | None = None,
    *,
    failures_path: str | Path | None = None,
    sleep: Callable[[float], None] = time.sleep,
    progress_every: int = 1000,
    keep_results: bool = False,
    progress_bar: bool | None = None,
) -> FetchSummary:
    """Download every job's URL to `image_root/job.path`, skipping files already there.

    Failures (one per URL) are written as JSON lines to `failures_path` (default
    `<image_root>/fetch_failures.jsonl`), rewritten on each run so that it lists what is still
    missing. One download per distinct path (the first job naming it). `sleep` is the backoff
    wait (tests pass a fake). `keep_results`: keep every FetchResult in the summary (failures are
    always kept); off by default so a crawl of millions of images holds only counts.
    `progress_bar`: a tqdm bar on stderr (count, rate, ETA; failures in its postfix); default:
    when stderr is a terminal. `config`: default `FetchConfig()`.
    """
    import sys

    if config is None:
        config = FetchConfig()
    if progress_bar is None:
        progress_bar = sys.stderr.isatty()
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        total = len({j.path for j in jobs}) if isinstance(jobs, (list, tuple)) else None
        bar = tqdm(total=total, desc="fetch", unit="img",
                   file=sys.stderr, dynamic_ncols=True)
    root = Path(image_root)
    root.mkdir(parents=True, exist_ok=True)
    fpath = Path(failures_path) if failures_path is not None else root / FAILURES_FILE
    summary = FetchSummary(failures_path=fpath)
    fpath.parent.mkdir(parents=True, exist_ok=True)
    with open(fpath, "w", encoding="utf-8") as ffile:

        def record(r: FetchResult) -> None:  # called from this thread only
            summary.add(r, keep_results)
            if r.status == "failed":
                ffile.write(json.dumps({
                    "url": r.url, "path": r.path, "reason": r.reason, "attempts": r.attempts,
                    "http_status": r.http_status, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }) + "\n")
                ffile.flush()
            done = summary.downloaded + summary.skipped + summary.failed
            if bar is not None:
                bar.update(1)
                if r.status == "failed":
                    bar.set_postfix(failed=summary.failed, refresh=False)
            if progress_every and done % progress_every == 0:
                log.info("fetch: %d done (downloaded %d, skipped %d, failed %d)",
                         done, summary.downloaded, summary.skipped, summary.failed)

        pending: set[cf.Future] = set()
        paths: set[str] = set()
        max_pending = config.concurrency * 4
        with cf.ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="fetch") as pool:
            try:
                for job in jobs:
                    if job.path in paths:
                        continue
                    paths.add(job.path)
                    quick = _precheck(job, root)
                    if quick is not None:
                        record(quick)
                        continue
                    pending.add(pool.submit(_fetch_one, job, root, config, sleep))
                    if len(pending) >= max_pending:
                        done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                        for fut in done:
                            record(fut.result())
                for fut in cf.as_completed(pending):
                    record(fut.result())
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    if bar is not None:
        bar.close()
    if summary.failed == 0:
        fpath.unlink(missing_ok=True)
        summary.failures_path = None
    return summary


def _precheck(job: FetchJob, root: Path) -> FetchResult | None:
    """Cheap checks done before a worker is used: bad path or scheme, or already present."""
    try:
        dest = target_path(root, job.path)
    except ValueError as e:
        return FetchResult(job.url, job.path, "failed", reason=str(e))
    scheme = urllib.parse.urlsplit(job.url).scheme.lower()
    if scheme not in ("http", "https"):
        return FetchResult(job.url, job.path, "failed", reason=f"unsupported URL scheme {scheme!r} (http/https only)")
    if dest.is_file():
        return FetchResult(job.url, job.path, "skipped", bytes=dest.stat().st_size)
    return None


def _fetch_one(job: FetchJob, root: Path, config: FetchConfig, sleep: Callable[[float], None]) -> FetchResult:
    dest = target_path(root, job.path)
    part = dest.with_name(dest.name + PART_SUFFIX)
    attempts = 0
    last: _Transient | None = None
    while attempts <= config.retries:
        if attempts:
            delay = min(config.backoff_max, config.backoff * 2 ** (attempts - 1))
            if last is not None and last.retry_after is not None:
                delay = min(config.backoff_max, max(delay, last.retry_after))
            sleep(delay)
        attempts += 1
        try:
            size, status = _download(job.url, part, config)
            if config.verify_image:
                _verify_image(part)
            os.replace(part, dest)
            return FetchResult(job.url, job.path, "downloaded", attempts=attempts, http_status=status, bytes=size)
        except _Transient as e:
            last = e
            log.debug("fetch %s attempt %d: %s", job.url, attempts, e.reason)
        except _Permanent as e:
            part.unlink(missing_ok=True)
            return FetchResult(
                job.url, job.path, "failed", attempts=attempts, reason=e.reason, http_status=e.http_status
            )
        except OSError as e:  # network errors are _Transient by now: this is local disk trouble
            part.unlink(missing_ok=True)
            return FetchResult(job.url, job.path, "failed", attempts=attempts, reason=f"cannot write {dest}: {e}")
        except Exception as e:  # one odd URL must not end a crawl of millions: record it
            part.unlink(missing_ok=True)
            return FetchResult(
                job.url, job.path, "failed", attempts=attempts, reason=f"unexpected error: {type(e).__name__}: {e}"
            )
    part.unlink(missing_ok=True)
    assert last is not None
    return FetchResult(job.url, job.path, "failed", attempts=attempts,
                       reason=f"{last.reason} (gave up after {attempts} attempts)", http_status=last.http_status)


def _ascii_url(url: str) -> str:
    """Percent-encode non-ASCII characters and spaces (http.client sends ASCII request lines only)."""
    if url.isascii() and " " not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname.encode("idna").decode("ascii") if parts.hostname else ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    if parts.username:
        netloc = parts.username + (f":{parts.password}" if parts.password else "") + "@" + netloc
    safe = "/%:@!$&'()*+,;=-._~?"
    return urllib.parse.urlunsplit((parts.scheme, netloc, urllib.parse.quote(parts.path, safe=safe),
                                    urllib.parse.quote(parts.query, safe=safe), ""))


def _download(url: str, part: Path, config: FetchConfig) -> tuple[int, int]:
    """GET `url` into `part`; returns (bytes written, HTTP status). Raises _Transient/_Permanent."""
    try:
        req = urllib.request.Request(
            _ascii_url(url), headers={"User-Agent": config.user_agent, "Accept": "image/*,*/*;q=0.8"})
    except (ValueError, UnicodeError) as e:
        raise _Permanent(f"invalid URL: {e}") from None
    try:
        resp = urllib.request.urlopen(req, timeout=config.timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code >= 500 or e.code == 429:
            raise _Transient(f"HTTP {e.code} {e.reason}", e.code, _retry_after(e.headers.get("Retry-After"))) from None
        raise _Permanent(f"HTTP {e.code} {e.reason}", e.code) from None
    except urllib.error.URLError as e:
        raise _Transient(f"connection error: {e.reason}") from None
    except (http.client.InvalidURL, ValueError) as e:
        raise _Permanent(f"invalid URL: {e}") from None
    except TimeoutError as e:
        raise _Transient(f"timed out waiting for the response ({e})") from None
    except (OSError, http.client.HTTPException) as e:
        raise _Transient(f"connection error: {type(e).__name__}: {e}") from None
    with resp:
        status = resp.status
        length_header = resp.headers.get("Content-Length")
        expected = int(length_header) if length_header and length_header.isdigit() else None
        if expected is not None and expected > config.max_bytes:
            raise _Permanent(f"Content-Length {expected} exceeds max_bytes {config.max_bytes}", status)
        part.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(part, "wb") as f:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except http.client.IncompleteRead as e:
                    raise _Transient(
                        f"truncated body: got {written + len(e.partial)} of {expected} bytes", status
                    ) from None
                except TimeoutError:
                    raise _Transient(f"timed out reading the body after {written} bytes", status) from None
                except (OSError, http.client.HTTPException) as e:
                    raise _Transient(f"connection error while reading: {type(e).__name__}: {e}", status) from None
                if not chunk:
                    break
                written += len(chunk)
                if written > config.max_bytes:
                    raise _Permanent(f"body exceeds max_bytes {config.max_bytes}", status)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    if expected is not None and written != expected:
        raise _Transient(f"truncated body: got {written} of {expected} bytes", status)
    if written == 0:
        raise _Permanent("empty body", status)
    return written, status


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _verify_image(path: Path) -> None:
    """PIL's structural check, then a full decode (catches truncated JPEG data verify misses),
    skipped for images above PIL's pixel limit so that parallel downloads stay small in memory."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            if im.width * im.height <= (Image.MAX_IMAGE_PIXELS or 0):
                im.load()
    except Exception as e:  # decoders raise many types on hostile bytes: all mean "not an image"
        raise _Permanent(f"not a decodable image: {type(e).__name__}: {e}") from None


def summarize(summary: FetchSummary, no_url: int = 0) -> str:
    """One-line summary for the CLI."""
    text = f"downloaded {summary.downloaded}, skipped {summary.skipped} (already present), failed {summary.failed}"
    if no_url:
        text += f"; {no_url} image refs have no URL"
    if summary.failures_path is not None:
        text += f"; failures listed in {summary.failures_path}"
    return text

