"""Training checkpoints with orbax: only what trains, the step, and the data position.

A checkpoint holds the trainable tree (adapters and the trained params such as the head), the
optimizer state and the step. The input pipeline is indexed by step (``data.train_batches``
with ``start_step``), so the step is also the data iterator's position. Orbax writes each
step into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint intact; ``latest_step`` sees finished ones only.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

_METRIC = "val_accuracy"


def _val_accuracy(metrics: dict[str, float]) -> float:
  return metrics[_METRIC]


class Checkpointer:
  """Keeps the last ``keep`` checkpoints and the one with the best validation accuracy."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, use_async: bool = True):
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_val_accuracy, reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        # create=False: the directory appears with the first save, not for a run refused first
        preservation_policy=policy, enable_async_checkpointing=use_async, create=False,
        best_fn=_val_accuracy, best_mode="max")  # what best_step() ranks by
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, *, meta: dict[str, Any],
           val_accuracy: float | None = None) -> None:
    """Saves ``state`` (a pytree of arrays) at ``step``; ``meta`` is JSON (e.g. the data seed)."""
    metrics = None if val_accuracy is None else {_METRIC: float(val_accuracy)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._manager.save(step, args=args, metrics=metrics, force=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the highest validation accuracy (None before any was measured)."""
    return self._manager.best_step()

  def meta(self, step: int) -> dict[str, Any]:
    """The ``meta`` saved with ``step`` (without reading the state)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores ``step``'s state into the structure, shapes and shardings of ``abstract_state``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    return self._manager.restore(step, args=args).state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def write_json_atomic(path: str | pathlib.Path, obj: Any) -> None:
  """Writes JSON through a temporary file and a rename, so readers never see half a file."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.replace(path)
