"""What a user sees: a progress bar, JSONL metrics and TensorBoard summaries in the workdir."""

from __future__ import annotations

import json
import os
import pathlib
import time

import tqdm

RESULTS_KEY = "steps"  # only the final results line (``train_and_evaluate``'s) holds it


def _kept(line: str, resume_step: int, finished: bool) -> bool:
  """Whether a resumed run keeps a metrics.jsonl line: one logged at or before its checkpoint,
  not torn (half-written), and not the final results of a finished run (it writes them again)."""
  try:
    record = json.loads(line)
    return int(record["step"]) <= resume_step and not (finished and RESULTS_KEY in record)
  except (ValueError, KeyError, TypeError):
    return False


class MetricWriter:
  """Appends ``{"step": s, **scalars}`` lines to ``metrics.jsonl`` and TensorBoard scalars.

  ``resume_step``: a run resumed from that checkpoint drops the lines an interrupted run wrote
  after it (they are written again), so every step appears once; ``finished``: the run resumed
  has no step left to train, so its results line at ``resume_step`` is written again (dropped
  here: a finished run run again ends with one). A finished run given more epochs keeps it.
  """

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True,
               resume_step: int | None = None, finished: bool = False):
    self._enabled = enabled
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    if resume_step is not None and path.exists():
      kept = [line for line in path.read_text().splitlines(keepends=True)
              if _kept(line, resume_step, finished)]
      tmp = path.with_name(path.name + ".tmp")
      tmp.write_text("".join(kept))
      os.replace(tmp, path)
    self._jsonl = open(path, "a")  # noqa: SIM115
    from tensorboardX import SummaryWriter  # heavy import, only where used
    # a resume drops the event files' steps after its checkpoint, as metrics.jsonl's above; the
    # suffix keeps a writer opened in the same second from truncating the last one's file
    self._tb = SummaryWriter(str(workdir / "tensorboard"), filename_suffix=f".{time.time_ns()}",
                             purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float))
               or getattr(v, "shape", None) == ()}
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A tqdm bar showing loss, accuracy, learning rate and images per second."""

  def __init__(self, *, total: int, initial: int, batch_size: int, enabled: bool = True):
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                          dynamic_ncols=True)
    self._batch_size = batch_size
    self._last = (initial, time.perf_counter())

  def update(self, step: int, metrics: dict[str, float]) -> float:
    """Advances the bar to ``step``; returns images per second since the last update."""
    last_step, last_time = self._last
    now = time.perf_counter()
    img_s = (step - last_step) * self._batch_size / max(now - last_time, 1e-9)
    self._last = (step, now)
    self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}",
                          lr=f"{metrics['lr']:.2e}", img_s=f"{img_s:.0f}")
    self._bar.update(step - self._bar.n)
    return img_s

  def restart_clock(self, step: int) -> None:
    """The next ``update`` times from now (work since ``step`` was not training)."""
    self._last = (step, time.perf_counter())

  def close(self) -> None:
    self._bar.close()
