"""A run folder holds one run, written by one trainer at a time.

- An OS file lock (flock) on `.nanods.lock` is held for the trainer's life; the kernel drops it
  when the process dies, so a kill -9 never leaves a stale lock behind. (Windows has no flock:
  there the folder is not locked.)
- `--overwrite` first moves the old run into `.replaced/` and deletes it only once the new run
  has saved a complete checkpoint pair. If the new run dies before that, the next trainer to
  take the lock (or the failing one itself) moves the old run back.
- Temp files of a save cut short, and training states that pair with no weights, are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from nanods import checkpoint
from nanods.atomic import atomic_write
from nanods.errors import NanodsError
from nanods.safetensors_header import read_header

try:
    import fcntl
except ImportError:
    fcntl = None

LOCK = ".nanods.lock"
ASIDE = ".replaced"
MARKER = "replaced.json"  # in ASIDE: the replacing run's id, and whether every old file was moved
_RUN_FILE = rf"({re.escape(checkpoint.WEIGHTS)}|{checkpoint.STATE_FILE}|metrics\.jsonl|loss\.png)"
RUN_FILES = re.compile(rf"^{_RUN_FILE}$")
_TEMP = re.compile(rf"^\.{_RUN_FILE}\..+\.tmp$")  # what atomic_write leaves when killed mid-write


class RunDir:
    """The run folder `path`: lock it, set an old run aside, recover from an interrupted trainer.

    Every OSError becomes one NanodsError line naming the folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._created: list[Path] = []  # what acquire() made, removed again if no run ever lands here

    @contextlib.contextmanager
    def _failing(self, doing: str):  # noqa: ANN202 - a context manager
        try:
            yield
        except OSError as e:
            raise NanodsError(f"cannot {doing} the run folder '{self.path}' ({e.strerror or e}); "
                              "check its permissions and free space, or pick another --out") from None

    # ---- the lock ---------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the folder's lock, or refuse at once naming the process that holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise NanodsError(f"--out '{self.path}' is a file, not a folder; pick another --out")
        lock = self.path / LOCK
        with self._failing("lock"):
            if not self.path.exists():
                self.path.mkdir(parents=True)
                self._created.append(self.path)
            if not lock.exists():
                self._created.insert(0, lock)
            if fcntl is None:
                return
            self._fd = self._lock(lock)
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(self._fd, 0)
            os.write(self._fd, json.dumps(owner).encode())

    def _lock(self, lock: Path) -> int:
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_owner(fd)
                os.close(fd)
                raise NanodsError(f"'{self.path}' is in use by another trainer ({holder}); wait for it to end, "
                                  "or pick another --out") from None
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file as we opened it: lock the one there now

    def release(self) -> None:
        """Drop the lock; a folder that never received a run loses the lock file (and itself, if made here)."""
        with contextlib.suppress(OSError):
            if not self.run_files():
                for made in self._created:
                    if made.name == LOCK:
                        made.unlink()
                    else:
                        made.rmdir()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ---- one run per folder -----------------------------------------------------------------
    def set_aside(self, new_run: str) -> None:
        """--overwrite: move the old run into .replaced/ (deleted after the new run's first save)."""
        aside = self.path / ASIDE
        with self._failing("set aside the old run in"):
            aside.mkdir()
            atomic_write(aside / MARKER, json.dumps({"by_run": new_run, "moved": False}).encode())
            for item in self.run_files():
                os.replace(item, aside / item.name)
            atomic_write(aside / MARKER, json.dumps({"by_run": new_run, "moved": True}).encode())

    def finish_overwrite(self) -> None:
        """The new run has a complete checkpoint pair: the run it replaced can go."""
        shutil.rmtree(self.path / ASIDE, ignore_errors=True)

    def recover(self, note: Callable[[str], None]) -> None:
        """Undo or finish an --overwrite that was cut short, and remove what a cut-short save left."""
        with self._failing("repair"):
            for item in self.path.iterdir():
                if _TEMP.match(item.name):
                    item.unlink(missing_ok=True)
            aside = self.path / ASIDE
            if aside.is_dir():
                marker = _read_json(aside / MARKER)
                by_run = marker.get("by_run")
                saved = checkpoint.saved_metadata(self.path / checkpoint.WEIGHTS) or {}
                never_saved = not by_run or checkpoint.metadata_run(saved) != by_run  # the replacing run has no pair
                if never_saved and self._restore(aside, replaced_moved=marker.get("moved") is True):
                    note(f"put back the run in '{self.path}' that an unfinished --overwrite had set aside")
                shutil.rmtree(aside)
            self._remove_orphan_states()

    def _restore(self, aside: Path, replaced_moved: bool) -> int:
        """Move the old run back; returns how many files. Once every old file was moved, the run files
        here are the replacing run's and go first; before that, they are old files not yet moved."""
        if replaced_moved:
            for item in self.run_files():
                item.unlink()
        old = [item for item in aside.iterdir() if RUN_FILES.match(item.name)]
        for item in old:
            os.replace(item, self.path / item.name)
        return len(old)

    def run_files(self) -> list[Path]:
        """The files of a run here (weights, states, metrics, plot), sorted by name."""
        return sorted(p for p in self.path.iterdir() if RUN_FILES.match(p.name))

    def _remove_orphan_states(self) -> None:
        """Training states that pair with no weights here (a save cut short between its two files)."""
        weights = self.path / checkpoint.WEIGHTS
        try:
            meta = read_header(weights)[1] if weights.exists() else {}
            keep = checkpoint.state_path(self.path, checkpoint.metadata_step(meta, weights)) if meta else None
        except NanodsError:
            return  # damaged weights: leave everything for the user (resume will name the problem)
        for state in self.path.glob("train_state_*.safetensors"):
            if state != keep:
                state.unlink(missing_ok=True)


def _read_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(owner['pid'])} on {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is still starting"


def _read_json(path: Path) -> dict:
    """A small JSON object written with atomic_write; {} when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}

