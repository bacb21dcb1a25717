"""A run's directory: resolving the path a user typed, and the lock that keeps a second run out of it.

``resolve`` turns a local path into an absolute one (``~`` expanded: bash leaves it alone after ``--workdir=``) once,
at the entry points, so nothing downstream (orbax refuses relative paths) sees a relative path; URLs such as
``gs://bucket/run`` pass unchanged.

``WorkdirLock`` is taken before a run writes anything into its directory and released when it exits: DIR/run.lock
holds the owner's host, pid, process start time and command. A second run on a locked directory is refused with the
owner's details (``WorkdirLockedError``); a lock whose owner is gone (same host, pid not running or running another
program) is stale and taken over with a log line; an owner on another host cannot be checked, so only ``force``
takes its lock. Multi-host runs: process 0 holds the lock on the shared directory and its verdict (taken, or the
refusal's message) is handed to every other process (``share``) before anything is compiled, so that all of them
refuse a locked directory in the same one line instead of process 1 waiting in a collective for a process 0 that has
gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from etils import epath

from simdino_jax.errors import SimdinoError

LOCK_NAME = "run.lock"


class WorkdirLockedError(SimdinoError, RuntimeError):
  """Another run holds the workdir's lock; the message names its host, pid, start time and command."""


def resolve(path: str) -> str:
  """An absolute local path (``~`` expanded, symlinks kept), or a URL (``scheme://...``) unchanged."""
  path = os.fspath(path)
  if "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def _process_start(pid: int) -> str | None:
  """The start time of ``pid`` in clock ticks since boot (Linux /proc), or None where it cannot be read."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rpartition(")")[2].split()[19]  # field 22 of stat; fields after the command name
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  """Whether ``pid`` on this host is the process that took the lock (same start time where /proc tells it)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    pass
  now = _process_start(pid)
  return start is None or now is None or now == start


class WorkdirLock:
  """Context manager holding DIR/run.lock (see the module docstring); ``enabled=False`` (processes other than 0)
  takes no lock. ``log`` receives the one line said when a stale lock is taken over. ``share(verdict) -> verdict``
  (several processes: ``sharding.process_0_says``) returns process 0's verdict on every process: "" when it took the
  lock, else its refusal, which every process then raises as WorkdirLockedError."""

  def __init__(self, workdir: str, *, force: bool = False, enabled: bool = True, log=print, share=None):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.force, self.enabled, self.log, self.share = force, enabled, log, share
    self.owner = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "start": _process_start(os.getpid()),
      "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "command": " ".join(sys.argv),
    }
    self.held = False

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):  # a lock file cut short (the owner was killed while writing it): stale
      return {}

  def _create(self) -> bool:
    """Writes the lock file if none exists; False if one does (atomic on a local disk: O_CREAT | O_EXCL)."""
    text = json.dumps(self.owner, indent=2)
    if "://" in str(self.path):  # object stores have no exclusive create: check, then write (best effort)
      if self.path.exists():
        return False
      self.path.write_text(text)
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def acquire(self) -> None:
    verdict = ""
    try:
      if self.enabled:
        self._acquire()
    except WorkdirLockedError as e:
      verdict = str(e)
    except BaseException as e:  # an unreadable directory...: the other processes must not wait for process 0
      self._share(f"process 0 could not take the lock {self.path}: {' '.join(str(e).split())}")
      raise
    verdict = self._share(verdict)
    if verdict:
      raise WorkdirLockedError(verdict)

  def _share(self, verdict: str) -> str:
    if self.share is None:
      return verdict
    try:
      return self.share(verdict)
    except Exception as e:  # pylint: disable=broad-except  (e.g. process 0 never said: DEADLINE_EXCEEDED)
      raise WorkdirLockedError(
        f"could not learn from process 0 whether it holds the lock {self.path}: {' '.join(str(e).split())[:300]}"
      ) from None

  def _acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a lock released or taken over between our attempts: try again
      if self._create():
        self.held = True
        return
      other = self._read()
      if other is None:
        continue
      same_host = other.get("host") == self.owner["host"]
      pid = other.get("pid")
      if not other or (same_host and isinstance(pid, int) and not _alive(pid, other.get("start"))) or self.force:
        why = (
          "forced (--force)"
          if self.force and other and (not same_host or _alive(pid, other.get("start")))
          else "its owner is not running"
        )
        self.log(
          f"taking over the lock {self.path} of pid {pid} on {other.get('host')} "
          f"(started {other.get('started')}): {why}"
        )
        self.path.unlink(missing_ok=True)
        continue
      hint = (
        "wait for it to finish, stop it, or use another --workdir"
        if same_host
        else "it runs on another host and cannot be checked from here: if it is gone, re-run with --force"
      )
      raise WorkdirLockedError(
        f"{self.path.parent} is in use by pid {pid} on {other.get('host')} since {other.get('started')} "
        f"({other.get('command')}); {hint}"
      )
    raise WorkdirLockedError(f"could not take the lock {self.path}: it kept changing (several runs starting?)")

  def release(self) -> None:
    if self.held:
      if self._read() == self.owner:  # never remove a lock another run took over (e.g. with --force)
        self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
