"""`fetch_images` shows a progress bar (count of total, failures) when asked; no network needed:
non-http URLs fail in the pre-check."""
from __future__ import annotations

from pipeline.ingest.fetch import FetchConfig, FetchJob, fetch_images


def test_fetch_progress_bar_counts_every_distinct_path_and_failures(tmp_path, capsys):
    jobs = [FetchJob("ftp://x/a.jpg", "a.jpg"), FetchJob("ftp://x/b.jpg", "b.jpg"),
            FetchJob("ftp://x/b.jpg", "b.jpg")]  # the same path twice: one download
    s = fetch_images(jobs, tmp_path, FetchConfig(), progress_bar=True)
    err = capsys.readouterr().err
    assert s.failed == 2
    assert "fetch" in err and "2/2" in err and "failed=2" in err
    fetch_images(jobs, tmp_path, FetchConfig(), progress_bar=False)
    assert "2/2" not in capsys.readouterr().err
