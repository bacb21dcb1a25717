"""The training run's metrics log: everything the loop reports about itself, in one place.

``MetricsLog`` owns, under the workdir DIR (main process only; the other processes compute nothing and write nothing):
  DIR/metrics.jsonl    one JSON object per ``write`` (step, the values, steps_per_sec, images_per_sec); on a resumed
                       run the records after the resumed step are dropped first (they will be logged again), and the
                       last kept record is ``last_record`` (the trainer carries ``data/skipped`` on from it). Appended
                       to on a local disk, rewritten whole at each write on object stores (gs://), which cannot append.
  DIR/tensorboard/     TensorBoard event files (tensorboardX, no TensorFlow): a scalar per value, flushed at each write.
                       A resumed run starts a new event file whose purge marker (``purge_step``) hides the steps after
                       the resumed checkpoint that the interrupted run had logged.
  Weights & Biases     the same scalars, when the ``wandb`` package is installed and ``config.wandb.project`` is set
                       (an optional dependency, imported only then); DIR/wandb_id.txt holds the run's id so that a
                       resumed run continues the same W&B run.
  the progress line    ``step N/T (P%) | loss .. | lr .. m .. | X steps/s Y img/s | elapsed H:MM:SS | ETA H:MM:SS``
                       on stdout. Rates and ETA exclude the jit compilation: the first write after the start (whose
                       interval includes compiling the step) shows the elapsed time only.
  DIR/curves.png       ``draw_curves()``, through ``simdino_jax.plot`` (a failure is a warning, never an exception).

Used as a context manager by the loop::

  with MetricsLog(workdir, total_steps=T, start_step=start, batch_size=B, config=config, is_main=...) as metrics:
    skipped = int((metrics.last_record or {}).get("data/skipped", 0))
    for step in ...:
      metrics.write(done, values)
  metrics.draw_curves()
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from typing import Any, Callable, Iterable, Mapping

from etils import epath

from simdino_jax.progress import hms

_logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"


class MetricsLog:
  """metrics.jsonl + TensorBoard + W&B + the progress line of one training run (see the module docstring).

  Args:
    workdir: the run's directory (local, or an object store such as gs:// through etils.epath).
    total_steps: the step the run ends at (progress percentage and ETA).
    start_step: the step this run starts from (0, or the resumed checkpoint's step): records after it are dropped
      from metrics.jsonl, TensorBoard events after it are purged, and the rates count steps from it.
    batch_size: the global batch size (images_per_sec = steps_per_sec * batch_size).
    progress_keys: the values shown in the progress line, in order, when present (the trainer passes the
      method's ``progress_line_keys``: the loss, its terms and the collapse monitors).
    config: the run's config (ConfigDict or mapping): stored in the W&B run; ``tensorboard`` / ``wandb`` default to
      its fields of the same names.
    is_main: whether this process writes and prints (process 0); the others only compute the records.
    tensorboard: write DIR/tensorboard/ event files (default: ``config.tensorboard``, else True).
    wandb: the W&B settings, a mapping with project, entity, name, mode ("online" / "offline"), tags (default:
      ``config.wandb``); W&B is used when project is non-empty.
    clock: seconds, for the rates and elapsed time (tests pass a fake one).
    printer: where the progress line and ``log`` messages go (default: print to stdout, flushed).
  """

  def __init__(
    self,
    workdir,
    *,
    total_steps: int,
    start_step: int = 0,
    batch_size: int = 1,
    progress_keys: Iterable[str] = ("loss",),
    config: Any = None,
    is_main: bool = True,
    tensorboard: bool | None = None,
    wandb: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
    printer: Callable[[str], None] | None = None,
  ):
    self.workdir = workdir
    self.path = epath.Path(workdir)
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.batch_size = int(batch_size)
    self.progress_keys = tuple(progress_keys)
    self.config = config
    self.is_main = is_main
    self._clock = clock
    self._printer = printer
    self.t_start = clock()
    self._last = (self.t_start, self.start_step)  # (time, step) of the previous write (or of the start)
    self._first = None  # (time, step) of the first write: the ETA's rate is measured from it (compilation excluded)
    self.last_record: dict | None = None  # the last record kept from the interrupted run (resume), else None
    self._jsonl = self._tb = self._wandb_run = None
    self._closed = False
    if not is_main:
      return
    if tensorboard is None:
      tensorboard = bool(_get(config, "tensorboard", True))
    if wandb is None:
      wandb = _get(config, "wandb", None)
    self.path.mkdir(parents=True, exist_ok=True)
    self._jsonl = self._open_jsonl()
    if tensorboard:
      self._tb = self._open_tensorboard()
    if wandb is not None and _get(wandb, "project", ""):
      self._wandb_run = self._open_wandb(wandb)

  # -- sinks -----------------------------------------------------------------------------------------------------------
  def _open_jsonl(self) -> "JsonLinesWriter":
    """metrics.jsonl starting from the records with step <= start_step (lines cut short by a kill are dropped)."""
    path = self.path / METRICS_FILE
    kept = []
    if path.exists():
      with path.open() as f:
        for line in f:
          try:
            record = json.loads(line)
            if record["step"] <= self.start_step:
              kept.append(line if line.endswith("\n") else line + "\n")
              self.last_record = record
          except (ValueError, KeyError, TypeError):  # e.g. a line cut short when the process was killed
            pass
    return JsonLinesWriter(path, kept)

  def _open_tensorboard(self) -> "EventFile | None":
    logdir = os.fspath(self.path / TENSORBOARD_DIR)
    try:
      # purge_step: TensorBoard hides the events of earlier files at steps > start_step (logged by an interrupted run
      # after the checkpoint this run resumed from). The suffix keeps files created within one second apart, in order.
      return EventFile(logdir, purge_step=self.start_step + 1, suffix=f".{self.start_step:010d}.{os.getpid()}")
    except Exception as e:  # pylint: disable=broad-except  (e.g. gs:// without google-cloud-storage)
      self._warn(f"TensorBoard logging is off: could not open {logdir}: {type(e).__name__}: {e}")
      return None

  def _open_wandb(self, settings):
    project = _get(settings, "project", "")
    try:
      import wandb  # pylint: disable=g-import-not-at-top  (an optional dependency: imported only when enabled)
    except ImportError:
      self._warn(
        f"config.wandb.project={project!r} but the wandb package is not installed (pip install wandb): "
        "not logging to Weights & Biases; training goes on, metrics.jsonl is written as usual"
      )
      return None
    try:
      run = wandb.init(
        project=project,
        entity=_get(settings, "entity", "") or None,
        name=_get(settings, "name", "") or None,
        mode=_get(settings, "mode", "") or "online",
        tags=list(_get(settings, "tags", ()) or ()) or None,
        config=_plain_config(self.config),
        # wandb writes its files locally: into a local workdir, else into its default ./wandb.
        dir=os.fspath(self.path) if "://" not in str(self.path) else None,
        resume="allow",
        id=self._wandb_id(),
      )
    except Exception as e:  # pylint: disable=broad-except  (no network, bad credentials: training goes on)
      self._warn(f"Weights & Biases logging is off: wandb.init failed: {type(e).__name__}: {e}")
      return None
    return run if run is not None else wandb.run

  def _wandb_id(self) -> str:
    """The W&B run id in DIR/wandb_id.txt: reused when resuming (start_step > 0), so that the W&B run continues;
    a new one for a run from step 0 (as metrics.jsonl starts again), since W&B ignores steps below its last one."""
    path = self.path / WANDB_ID_FILE
    if self.start_step > 0 and path.exists():
      run_id = path.read_text().strip()
      if run_id:
        return run_id
    run_id = secrets.token_hex(8)
    path.write_text(run_id + "\n")
    return run_id

  # -- the loop's calls ------------------------------------------------------------------------------------------------
  def write(self, step: int, values: Mapping[str, Any]) -> dict:
    """Log ``values`` at ``step``: one metrics.jsonl record (with steps_per_sec and images_per_sec since the previous
    write; for the first write since the start, whose interval includes the compilation), a TensorBoard scalar and a
    W&B value per number, and the progress line. Returns the record (on every process; only the main one writes)."""
    step = int(step)
    now = self._clock()
    t_prev, step_prev = self._last
    steps_per_sec = (step - step_prev) / max(now - t_prev, 1e-9)
    record = {"step": step, **values, "steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * self.batch_size}
    record["step"] = step
    first = self._first is None
    if first:
      self._first = (now, step)
    self._last = (now, step)
    if not self.is_main:
      return record
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(record, default=_json_default) + "\n")
      self._jsonl.flush()
    scalars = {k: float(v) for k, v in record.items() if k != "step" and _is_number(v)}
    if self._tb is not None:
      try:
        self._tb.write(step, scalars)
      except Exception as e:  # pylint: disable=broad-except  (a full disk must not stop training: jsonl goes on)
        self._warn(f"TensorBoard logging is off: {type(e).__name__}: {e}")
        self._close_tensorboard()
    if self._wandb_run is not None:
      try:
        self._wandb_run.log(scalars, step=step)
      except Exception as e:  # pylint: disable=broad-except
        self._warn(f"Weights & Biases logging is off: wandb log failed: {type(e).__name__}: {e}")
        self._finish_wandb()
    self.log(self.progress_line(record, now, first))
    return record

  def progress_line(self, record: Mapping[str, Any], now: float, first: bool) -> str:
    step, total = record["step"], self.total_steps
    terms = " ".join(f"{k} {record[k]:.4g}" for k in self.progress_keys if _is_number(record.get(k)))
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    if terms:
      parts.append(terms)
    if record.get("data/skipped"):
      parts.append(f"skipped {int(record['data/skipped'])} undecodable images")
    schedules = " ".join(
      ([f"lr {record['lr']:.3g}"] if _is_number(record.get("lr")) else [])
      + ([f"m {record['momentum']:.4f}"] if _is_number(record.get("momentum")) else [])
    )
    if schedules:
      parts.append(schedules)
    elapsed = f"elapsed {hms(now - self.t_start)}"
    if first:  # the interval includes compiling the step: no rate, no ETA yet
      parts.append(
        elapsed
        + (" (compilation included)" if step >= total else " (compilation included), rate and ETA from the next log")
      )
    else:
      parts.append(f"{record['steps_per_sec']:.2f} steps/s {record['images_per_sec']:.0f} img/s")
      t_first, step_first = self._first
      mean_rate = (step - step_first) / max(now - t_first, 1e-9)  # since the first write, evaluations included
      parts.append(f"{elapsed} | ETA {hms(max(total - step, 0) / max(mean_rate, 1e-9))}")
    return " | ".join(parts)

  def log(self, msg: str) -> None:
    """Print ``msg`` (flushed) on the main process only."""
    if not self.is_main:
      return
    if self._printer is not None:
      self._printer(msg)
    else:
      print(msg, flush=True)

  def draw_curves(self) -> list[str] | None:
    """DIR/curves.png from metrics.jsonl (main process); returns the panels drawn, or None. A failure is a warning,
    never the end of a run."""
    if not self.is_main:
      return None
    try:
      if self._jsonl is not None:
        self._jsonl.flush()
      from simdino_jax import plot  # pylint: disable=g-import-not-at-top  (matplotlib: only at the end)

      panels = plot.plot_curves(os.fspath(self.path))
      self.log(f"training curves ({len(panels)} panels) -> {os.path.join(os.fspath(self.path), 'curves.png')}")
      return panels
    except Exception as e:  # pylint: disable=broad-except  (a plot must never fail a finished run)
      self._warn(f"could not draw the training curves: {type(e).__name__}: {e}")
      return None

  def finish(self) -> None:
    """Close metrics.jsonl, the TensorBoard writer and the W&B run (idempotent)."""
    if self._closed:
      return
    self._closed = True
    try:
      if self._jsonl is not None:
        self._jsonl.close()
    finally:
      self._jsonl = None
      self._close_tensorboard()
      self._finish_wandb()

  close = finish

  def __enter__(self) -> "MetricsLog":
    return self

  def __exit__(self, *exc) -> None:
    self.finish()

  # -- helpers ---------------------------------------------------------------------------------------------------------
  def _close_tensorboard(self) -> None:
    tb, self._tb = self._tb, None
    if tb is not None:
      try:
        tb.close()
      except Exception as e:  # pylint: disable=broad-except
        self._warn(f"closing the TensorBoard writer failed: {type(e).__name__}: {e}")

  def _finish_wandb(self) -> None:
    run, self._wandb_run = self._wandb_run, None
    if run is not None:
      try:
        run.finish()
      except Exception as e:  # pylint: disable=broad-except
        self._warn(f"wandb finish failed: {type(e).__name__}: {e}")

  def _warn(self, msg: str) -> None:
    if self.is_main:
      _logger.warning("%s", msg)


class EventFile:
  """One TensorBoard event file under ``logdir``, written synchronously through tensorboardX (no TensorFlow): one
  event per ``write`` with a scalar per value, flushed (fsync) before ``write`` returns.

  tensorboardX.SummaryWriter queues events to a background thread and its ``flush`` does not wait for that queue,
  so a file read during the run (or after a kill) could miss the last steps; this writes the same records in the
  calling thread. ``purge_step``: a SessionLog START marker (SummaryWriter's ``purge_step``): TensorBoard drops the
  events of the files read before this one with step >= purge_step. gs:// and s3:// go through tensorboardX's
  record writers (google-cloud-storage / boto3)."""

  def __init__(self, logdir: str, *, purge_step: int | None = None, suffix: str = ""):
    # tensorboardX: a dependency; imported here so that importing this module does not load protobuf.
    from tensorboardX import event_file_writer, record_writer  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    record_writer.directory_check(logdir)
    self._writer = event_file_writer.EventsWriter(os.path.join(logdir, "events"), suffix)  # + file_version event
    if purge_step is not None:
      self._writer.write_event(
        event_pb2.Event(
          wall_time=time.time(), step=purge_step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        )
      )
    self._writer.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top  (tag cleaning as SummaryWriter's)

    values = [v for key, value in scalars.items() for v in summary.scalar(key, float(value)).value]
    self._writer.write_event(
      self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=self._summary_pb2.Summary(value=values))
    )
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class JsonLinesWriter:
  """A JSON-lines file through etils.epath, starting from the ``kept`` lines: appended to on a local disk, rewritten
  whole at each flush on object stores (gs://), which cannot append. ``write`` / ``flush`` / ``close`` as a file's."""

  def __init__(self, path: epath.Path, kept: list[str], append: bool | None = None):
    self.path = path
    self.local = "://" not in str(path) if append is None else append  # gs://, s3://: an object store
    self.lines = list(kept)
    self.pending = []
    self._write_all()
    self.file = path.open("a") if self.local else None

  def _write_all(self) -> None:
    tmp = self.path.parent / (self.path.name + ".tmp")
    tmp.write_text("".join(self.lines))
    tmp.replace(self.path)

  def write(self, text: str) -> None:
    if self.file is not None:
      self.file.write(text)
    else:
      self.pending.append(text)

  def flush(self) -> None:
    if self.file is not None:
      self.file.flush()
    elif self.pending:
      self.lines += self.pending
      self.pending = []
      self._write_all()

  def close(self) -> None:
    self.flush()
    if self.file is not None:
      self.file.close()
      self.file = None


def _get(obj, key: str, default=None):
  """``obj[key]`` for a mapping / ConfigDict (or an attribute), ``default`` when absent or obj is None."""
  if obj is None:
    return default
  if isinstance(obj, Mapping) or hasattr(obj, "get"):
    try:
      return obj.get(key, default)
    except (AttributeError, TypeError):
      pass
  return getattr(obj, key, default)


def _plain_config(config) -> dict | None:
  """The config as plain JSON-able dicts (W&B's config), or None."""
  if config is None:
    return None
  if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(config.to_json_best_effort())
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(dict(config), default=str))


def _is_number(v) -> bool:
  if isinstance(v, bool):
    return False
  if isinstance(v, (int, float)):
    return True
  return hasattr(v, "dtype") and getattr(v, "shape", None) == () and getattr(v.dtype, "kind", "?") in "iuf"


def _json_default(v):
  if hasattr(v, "item"):  # numpy / jax scalars
    return v.item()
  raise TypeError(f"not JSON serializable: {type(v).__name__}")
