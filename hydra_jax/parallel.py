"""Device mesh, shardings and multi-host set-up.

Data parallel by default: the batch is split over the mesh's "data" axis, adapters, head and
optimizer state are replicated. Frozen backbone weights are replicated too, or (``fsdp=True``)
split along their largest divisible axis so that a ViT-H fits beside its activations; XLA
gathers them where they are used.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"

_LOG = logging.getLogger(__name__)


def initialize_distributed(*, coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-host run (no-op when ``coordinator`` is None).

  On TPU pods and Slurm/GKE clusters ``jax.distributed.initialize()`` finds its peers itself:
  pass coordinator="auto". On CPU (tests) the collectives go through gloo.
  """
  if coordinator is None:
    if num_processes is not None or process_id is not None:
      raise ValueError(f"distributed.num_processes={num_processes} / process_id={process_id} "
                       "need distributed.coordinator (host:port of process 0, or 'auto')")
    return
  if jax.config.jax_platforms == "cpu" or jax.config.jax_platforms is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  _LOG.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def per_device(step, mesh: Mesh):
  """``step(state, frozen, batch, rng) -> (state, metrics)`` on each device's rows of the batch
  (``shard_map`` over the mesh's data axis; everything else replicated), for a step that reduces
  over ``DATA`` itself (``train_step(..., axis_name=DATA)``, as under pmap). Gradient accumulation
  needs it: under plain jit, GSPMD all-reduces the gradients inside the microbatch loop, once per
  part, where this reduces once per step. As under pmap, each device differentiates its own
  loss (no automatic reduction: ``check_vma=False``, which custom VJPs such as the LayerNorm's
  need) and the step's ``pmean`` makes the result the whole batch's."""
  rep = PartitionSpec()
  return jax.shard_map(step, mesh=mesh, in_specs=(rep, rep, PartitionSpec(DATA), rep),
                       out_specs=(rep, rep), check_vma=False)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ("data",) mesh over the first ``num_devices`` devices (all by default).

  Auto axis types: with jax's default Explicit types the class-token concat on a data-sharded
  batch raises a ShardingTypeError.
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices}; expected 1..{len(devices)}")
    if jax.process_count() > 1 and num_devices != len(devices):  # every process feeds its own
      raise ValueError(f"num_devices={num_devices}: a run of {jax.process_count()} processes uses "
                       f"all {len(devices)} devices (leave num_devices unset)")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def check_divides(mesh: Mesh, name: str, size: int) -> None:
  """Raises a ValueError naming ``name`` unless its ``size`` splits evenly over ``mesh``."""
  n = mesh.size
  if size % n:
    raise ValueError(f"{name} {size} does not split evenly over the {n} devices of the mesh; "
                     f"expected a multiple of {n} (or set parallel.num_devices)")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA))


FSDP_MIN_SIZE = 2**16  # leaves with fewer elements stay whole under FSDP


def _fsdp_spec(shape: tuple[int, ...], n: int, min_size: int) -> PartitionSpec:
  """Shards the largest axis that ``n`` divides; small or indivisible leaves stay whole."""
  if n == 1 or int(np.prod(shape)) < min_size:
    return PartitionSpec()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA
      return PartitionSpec(*spec)
  return PartitionSpec()


def frozen_shardings(mesh: Mesh, frozen, *, fsdp: bool, min_size: int = FSDP_MIN_SIZE):
  """Shardings for the frozen param tree: replicated, or FSDP-style split (leaves of at least
  ``min_size`` elements)."""
  n = mesh.shape[DATA]
  return jax.tree.map(lambda x: NamedSharding(
      mesh, _fsdp_spec(x.shape, n, min_size) if fsdp else PartitionSpec()), frozen)


def fetch(tree):
  """A host (numpy) copy of ``tree``, whose arrays may be split over other processes' devices
  (FSDP across hosts): those are gathered, a collective every process must call."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)
  return jax.tree.map(one, tree)


def replicate_for_pmap(tree, mesh: Mesh):
  """One copy of every leaf per device, stacked on a leading axis sharded over the mesh.

  The replacement for the deprecated ``jax.device_put_replicated``: ``jax.pmap`` takes such
  arrays with ``in_axes=0``.
  """
  n = mesh.shape[DATA]
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n, *np.shape(x))), sharding), tree)


def unreplicate_from_pmap(tree, mesh: Mesh):
  """The inverse of ``replicate_for_pmap``: one copy replicated over ``mesh``, kept on device.

  Each device keeps its own row of the stacked leaf (a slice on that device), so nothing moves
  through the host or between hosts.
  """
  rep = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_single_device_arrays(
          x.shape[1:], rep, [s.data[0] for s in x.addressable_shards]), tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's share of the batch into one globally sharded batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
