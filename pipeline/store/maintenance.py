"""Store maintenance as plain functions over (store root, `Index`): `clean_tmp` (what dead
writers left), `gc`, `fsck` (with `--repair`), `rebuild_index` (in place) and
`rebuild_index_file` (a new index.sqlite from the segment files alone, for a damaged index).
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import StoreError
from pipeline.store.fs import _fsync, _lock_is_held, _lock_path, _makedirs_durable, _part_path, owner_alive
from pipeline.store.index import Index
from pipeline.store.segment import _describe_segment, _verify_segment
from pipeline.store.writer import _pending_descriptor, commit_segment, pending_segments, quarantine, quarantine_reason


@dataclass
class FsckReport:
    """What `FeatureStore.fsck` found; `ok` when nothing is wrong."""

    segments_checked: int = 0  # segment files whose checksum was recomputed
    items_checked: int = 0  # index rows (successes and failures) resolved to a segment row
    view_entries_checked: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, naming the file/key/view
    repaired: list[str] = field(default_factory=list)  # what --repair changed

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [
            f"checked {self.segments_checked} segments, {self.items_checked} index rows, "
            f"{self.view_entries_checked} view entries: "
            + ("ok" if self.ok else f"{len(self.problems)} problem(s)")
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  repaired: {r}" for r in self.repaired]
        return "\n".join(lines)


@dataclass
class GcReport:
    """What `FeatureStore.gc` removed (or would remove with dry_run)."""

    dry_run: bool = False
    segments_removed: list[str] = field(default_factory=list)  # relative paths
    orphans_removed: list[str] = field(default_factory=list)  # files not in the index
    items_dropped: int = 0  # index rows (successes and failures) dropped
    bytes_freed: int = 0
    held_by: list[str] = field(default_factory=list)  # live leases: unreferenced work left alone

    def format(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        line = (
            f"{verb} {len(self.segments_removed)} unreferenced segments and "
            f"{len(self.orphans_removed)} orphan files ({self.bytes_freed / 1e6:.1f} MB), "
            f"{'would drop' if self.dry_run else 'dropped'} {self.items_dropped} index rows"
        )
        if self.held_by:
            line += (f"\n  flows are running ({'; '.join(self.held_by)}): stage outputs no view references "
                     "yet were kept; rerun gc when they are done")
        return line


# --------------------------------------------------------------------------------------------
# what dead writers left


def clean_tmp(root: Path, index: Index) -> list[str]:
    """Remove what dead writers left: their tmp files and any segment renamed but never indexed.

    A live writer holds the flock on its `tmp/<id>.lock` and is left alone. Returns paths removed."""
    tmp_dir = root / "tmp"
    removed: list[str] = []
    try:
        entries = sorted(tmp_dir.iterdir())
    except FileNotFoundError:
        return removed
    for p in entries:
        if p.suffix == ".lock":
            removed += _clean_abandoned(root, index, p.stem)
    for p in entries:
        if p.suffix == ".part" and not _lock_path(root, p.stem).exists():
            try:
                p.unlink()
                removed.append(str(p.relative_to(root)))
            except FileNotFoundError:
                pass
    for p in entries:
        # Work folders (word-vector conversion): owned while their `<name>.lock` is flock-ed.
        if p.is_dir() and not _lock_is_held(tmp_dir / f"{p.name}.lock"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p.relative_to(root)))
    return removed


def _clean_abandoned(root: Path, index: Index, seg_id: str) -> list[str]:
    lock = _lock_path(root, seg_id)
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return []
    removed: list[str] = []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return []  # a live writer
            raise
        target = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        part = _part_path(root, seg_id)
        if part.exists():
            part.unlink()
            removed.append(str(part.relative_to(root)))
        if target:
            tpath = root / target
            if (not index.segment_indexed(seg_id) and tpath.exists()
                    and tpath.resolve().is_relative_to(root / "segments")):
                tpath.unlink()
                removed.append(target)
        lock.unlink(missing_ok=True)
        removed.append(str(lock.relative_to(root)))
    finally:
        os.close(fd)
    return removed


def _segment_files(root: Path) -> dict[str, Path]:
    """Every *.h5 under segments/ by segment id (file stem)."""
    return {p.stem: p for p in (root / "segments").glob("*/*/*.h5")}


def _is_orphan(root: Path, index: Index, seg_id: str) -> bool:
    """A segment file no index row names and no live writer is about to commit."""
    if _lock_is_held(_lock_path(root, seg_id)):
        return False
    return not index.segment_indexed(seg_id)


def _stale_tmp(root: Path) -> list[str]:
    """tmp/ files no live writer owns (what `clean_tmp` would remove), without removing them."""
    tmp_dir = root / "tmp"
    out = []
    for p in sorted(tmp_dir.iterdir()):
        if p.suffix in (".lock", ".part") and not _lock_is_held(_lock_path(root, p.stem)):
            out.append(str(p.relative_to(root)))
        elif p.is_dir() and not _lock_is_held(tmp_dir / f"{p.name}.lock"):
            out.append(str(p.relative_to(root)))
    return out


def _remove_empty_dirs(root: Path) -> None:
    segments_dir = root / "segments"
    for d in sorted(segments_dir.glob("*/*"), reverse=True) + sorted(segments_dir.glob("*")):
        try:
            d.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# gc, fsck, rebuilds


def gc(root: Path, index: Index, dry_run: bool = False) -> GcReport:
    """Delete segments of (stage, fingerprint)s no view references, segments none of whose rows
    are indexed any more (after `forget` or a lost race), and orphan files.

    While a flow holds a lease (`FeatureStore.lease()`, taken by `mrhp extract`), stage
    fingerprints no view references yet are the flow's work in progress: gc leaves them alone,
    removes only segments whose items were all forgotten before the oldest lease began, and
    says so."""
    report = GcReport(dry_run=dry_run)
    leases, garbage, report.items_dropped = index.collect_garbage(dry_run)
    if leases:
        report.held_by = [f"{h} (pid {p} on {host}, since {time.strftime('%H:%M:%S', time.localtime(t))})"
                          for h, p, host, t in leases]
    for _, rel in garbage:
        path = root / rel
        report.segments_removed.append(rel)
        report.bytes_freed += path.stat().st_size if path.exists() else 0
        if not dry_run:
            path.unlink(missing_ok=True)
    removed = set(report.segments_removed)
    for seg_id, path in sorted(_segment_files(root).items()):
        rel = str(path.relative_to(root))
        if rel in removed or not _is_orphan(root, index, seg_id):
            continue
        report.orphans_removed.append(rel)
        report.bytes_freed += path.stat().st_size
        if not dry_run:
            path.unlink(missing_ok=True)
    if dry_run:
        report.orphans_removed += _stale_tmp(root)
    else:
        report.orphans_removed += clean_tmp(root, index)
        _remove_empty_dirs(root)
    return report


def fsck(root: Path, index: Index, repair: bool = False, *, checksums: bool = True) -> FsckReport:
    """Verify every segment's checksum, that every index row names an existing segment row,
    that every view entry resolves, and that no file lies outside the index.

    With `repair`: corrupt or missing segments lose their index rows (their items count as
    missing and are recomputed by the next run; corrupt files move to quarantine/), valid
    orphan segments are indexed again, pending segments of runs that ended (written by a task
    worker, never committed by its flow) are verified and indexed or quarantined, stale tmp
    files are removed. Dangling view entries
    cannot be repaired here: rerun the stage for that dataset. `checksums=False` skips reading
    the arrays (quick structural check)."""
    report = FsckReport()
    segments, rows_by_seg = index.snapshot()
    known = {s[0] for s in segments}
    bad_segments: list[tuple[str, str, bool]] = []  # (id, path, file exists)
    for seg_id, stage, fingerprint, rel, checksum in segments:
        path = root / rel
        items = rows_by_seg.get(seg_id, [])
        report.items_checked += len(items)
        if not path.exists():
            report.problems.append(f"{rel}: segment file missing ({len(items)} index rows point at it)")
            bad_segments.append((seg_id, rel, False))
            continue
        report.segments_checked += 1
        problem = _verify_segment(path, stage, fingerprint, checksum, items, checksums)
        if problem:
            report.problems.append(f"{rel}: {problem}")
            bad_segments.append((seg_id, rel, True))
    for seg, items in rows_by_seg.items():
        if seg not in known:
            report.items_checked += len(items)
            report.problems.append(
                f"index: {len(items)} item rows name segment {seg}, which is not in the index "
                f"(e.g. key {items[0][0]})"
            )
            if repair:
                index.drop_items_of(seg)
                report.repaired.append(f"dropped {len(items)} item rows naming unknown segment {seg}")
    if repair:
        for seg_id, rel, exists in bad_segments:
            n = index.drop_segment(seg_id)
            moved = ""
            if exists:
                q = root / "quarantine"
                _makedirs_durable(q)
                os.replace(root / rel, q / Path(rel).name)
                moved = f", moved the file to quarantine/{Path(rel).name}"
            report.repaired.append(f"{rel}: dropped {n} index rows (recomputed by the next run){moved}")
    for seg_id, path in sorted(_segment_files(root).items()):
        if seg_id in known or not _is_orphan(root, index, seg_id):
            continue
        rel = str(path.relative_to(root))
        report.problems.append(f"{rel}: orphan segment file (not in the index)")
        if repair:
            try:
                n = _adopt(root, index, path)
                report.repaired.append(f"{rel}: indexed the orphan segment ({n} new item rows)")
            except StoreError as e:
                q = root / "quarantine"
                _makedirs_durable(q)
                os.replace(path, q / path.name)
                report.repaired.append(f"{rel}: unusable orphan ({e}), moved to quarantine/{path.name}")
    for path in pending_segments(root):
        owner = path.parent.name
        if owner_alive(root, owner):
            continue  # a running flow's worker wrote it; that flow commits it
        rel = str(path.relative_to(root))
        report.problems.append(f"{rel}: segment written by a task worker, never committed (its run ended)")
        if repair:
            desc = _pending_descriptor(path, root)
            if desc is None:
                report.repaired.append(f"{rel}: {quarantine_reason(root, path)}")
                continue
            try:
                n = len(commit_segment(root, index, desc))
                report.repaired.append(f"{rel}: verified and indexed ({n} new item rows)")
            except StoreError as e:
                if path.exists():
                    report.repaired.append(f"{rel}: not adopted ({e}), moved to {quarantine(root, path)}")
                else:
                    report.repaired.append(f"{rel}: not adopted ({e})")
    for rel in _stale_tmp(root):
        report.problems.append(f"{rel}: left by a writer that died")
    if repair:
        report.repaired += [f"{r}: removed" for r in clean_tmp(root, index)]
    for dataset, stage, fingerprint, n, dangling in index.check_views():
        report.view_entries_checked += n
        if dangling:
            ex = ", ".join(f"{i} -> {k}" for i, k in dangling[:3])
            report.problems.append(
                f"view {dataset}/{stage} ({fingerprint}): {len(dangling)} of {n} entries do not resolve "
                f"(e.g. {ex}); rerun the {stage} stage for {dataset}"
            )
    return report


def _adopt(root: Path, index: Index, path: Path) -> int:
    """Index a self-describing segment file; returns the item rows added (existing keys win)."""
    seg_row, item_rows, schema = _describe_segment(path, root)
    return index.adopt(seg_row, item_rows, schema)


def rebuild_index(root: Path, index: Index) -> FsckReport:
    """Disaster recovery: rebuild the segments and items tables from the segment files alone
    (oldest segment wins for a key found twice). Views are kept; fsck then shows whether they resolve."""
    report = FsckReport()
    described = []
    for _, path in sorted(_segment_files(root).items()):
        report.segments_checked += 1
        try:
            described.append(_describe_segment(path, root))
        except StoreError as e:
            report.problems.append(f"{path.relative_to(root)}: skipped, {e}")
    described.sort(key=lambda d: d[0][7])  # created
    report.items_checked += index.replace_segments(described)
    report.repaired.append(f"rebuilt the index from {len(described)} segments ({report.items_checked} items)")
    return report


def rebuild_index_file(root: Path | str) -> FsckReport:
    """`mrhp fsck --rebuild-index`: a new index.sqlite built from the segment files alone.

    Works when the old index is unreadable, emptied or deleted. The new index is written beside
    the old one and renamed into place; the old file (with its -wal/-shm) is kept as
    `index.sqlite.damaged-<time>`. Views are copied from the old index when it still reads; else
    they are lost and the report says to rerun `mrhp extract` (which then only rewrites them).
    Items found in two segments: the oldest segment wins. Run it while nothing uses the store."""
    root = Path(root).resolve()
    index = root / "index.sqlite"
    report = FsckReport()
    described = []
    for path in sorted((root / "segments").glob("*/*/*.h5")):
        report.segments_checked += 1
        try:
            described.append(_describe_segment(path, root))
        except StoreError as e:
            report.problems.append(f"{path.relative_to(root)}: skipped, {e}")
    described.sort(key=lambda d: d[0][7])  # created
    views: list[tuple] = []
    view_items: list[tuple] = []
    view_note = "no index to take views from"
    if index.exists():
        try:
            views, view_items = Index.read_views(index)
            view_note = f"kept {len(views)} views from the old index"
        except sqlite3.Error as e:
            views, view_items = [], []
            view_note = f"the old index's views are unreadable ({str(e)[:120]}): rerun `mrhp extract` to rewrite them"
    new = root / "tmp" / f"index-rebuild-{uuid.uuid4().hex}.sqlite"
    _makedirs_durable(new.parent)
    try:
        report.items_checked += Index.write_new(new, described, views, view_items)
        _fsync(new)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old_file = root / f"index.sqlite{suffix}"
            if old_file.exists():
                os.replace(old_file, root / f"index.sqlite.damaged-{stamp}{suffix}")
        os.replace(new, index)
        _fsync(root)
    except (OSError, sqlite3.Error) as e:
        new.unlink(missing_ok=True)
        raise StoreError(f"rebuilding the store index {index}: {e}") from None
    report.repaired.append(
        f"rebuilt {index.name} from {len(described)} segments ({report.items_checked} items); {view_note}"
    )
    return report
