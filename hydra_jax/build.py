"""From a config to a model and its (pre-trained) params."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hydra_jax import assets, checkpoints, data
from hydra_jax.models import ARCHITECTURE_DEFAULTS, ViT, variant
from hydra_jax.models.vit import DTYPES


def data_dir(configured: str | None) -> str:
  """The tfds data directory: the configured one, else <cache>/tensorflow_datasets."""
  if configured:
    return str(pathlib.Path(configured).expanduser())
  return str(assets.cache_root() / "tensorflow_datasets")


def open_source(data_config, split: str):
  """The source of ``split`` that ``data_config`` (a config's ``data``) describes.

  ``data_config.vtab_task`` (set by configs/vtab1k.py) names a ``data.VTAB1K`` task: its label
  function, image function and class count then come from that table (``data.source_options``);
  otherwise the label is the ClassLabel feature ``data_config.label_key``.
  """
  cfg = data_config
  options = {}
  if cfg.get("vtab_task"):
    options = data.source_options(cfg.vtab_task)
    expected = data.TASKS[cfg.vtab_task]["tfds_name"]
    if cfg.name != expected:
      raise ValueError(f"data.vtab_task {cfg.vtab_task!r} reads tfds {expected!r}, but data.name "
                       f"is {cfg.name!r}")
  return data.get_source(cfg.name, split, data_dir=data_dir(cfg.get("data_dir")),
                         label_key=cfg.get("label_key") or "label", **options)


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {tuple(DTYPES)}")
  return DTYPES[name]


def run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a run recorded (``workdir/config.json``)."""
  path = pathlib.Path(workdir).expanduser() / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path.parent} is not a run directory (no config.json)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def model_rng(config) -> jax.Array:
  """The key a run gives ``build_model`` (a random-init backbone depends on it)."""
  return jax.random.fold_in(jax.random.key(config.seed), 0)


def build_model(config, rng: jax.Array) -> tuple[ViT, checkpoints.Pretrained]:
  """The ViT of ``config.model`` and its params, with a fresh head of ``config.data.num_classes``.

  ``config.model.checkpoint``: "default" (the bundled ViT-S/14, see ``hydra_jax.assets``), a
  checkpoint path (any format ``checkpoints.load`` reads), or "random" (also None, or "None" as
  a command line gives it) for a random ``variant`` (plus ``overrides``), as the tests use.
  ``config.model.pool`` overrides the checkpoint's pooling. A checkpoint's head of
  ``num_classes`` classes is kept (as timm keeps it) unless ``config.model.reset_head``;
  ``config.model.head_init`` sets how a fresh (all-zero) head starts (``init_head``).
  """
  model, pre = _build(config, rng)
  pre = dataclasses.replace(pre, params=init_head(pre.params, config.model.get("head_init"),
                                                  jax.random.fold_in(rng, 1)))
  return model, pre


def checkpoint_name(model_config) -> str:
  """``model.checkpoint``, with every spelling of a random backbone (None, "None", "none") as
  "random"."""
  given = model_config.checkpoint
  return "random" if given in (None, "random", "None", "none") else str(given)


HEAD_INITS = ("zeros", "torch")


def init_head(params: dict, how: str | None, rng: jax.Array) -> dict:
  """``params`` with a fresh head initialised as ``how`` says.

  "zeros" (or None) keeps the zero head (big_vision's); "torch" draws it as PyTorch's
  ``nn.Linear`` does (kernel and bias uniform in +-1/sqrt(fan_in)), as timm's
  ``reset_classifier`` in the official Hydra code gives it. A head with any non-zero value (a
  checkpoint's own, trained) is kept.
  """
  if how not in (None, *HEAD_INITS):
    raise ValueError(f"unknown model.head_init {how!r}; expected one of {HEAD_INITS}")
  head = params.get("head")
  if how in (None, "zeros") or head is None or any(
      np.any(np.asarray(x)) for x in jax.tree.leaves(head)):
    return params
  fan_in, classes = np.shape(head["kernel"])
  bound = 1.0 / np.sqrt(fan_in)
  k_kernel, k_bias = jax.random.split(rng)
  return {**params, "head": {
      "kernel": np.asarray(jax.random.uniform(k_kernel, (fan_in, classes), jnp.float32,
                                              -bound, bound)),
      "bias": np.asarray(jax.random.uniform(k_bias, (classes,), jnp.float32, -bound, bound))}}


def runtime_fields(config) -> dict:
  """The ViT fields of ``config.model`` that no checkpoint records (how it computes, not what):
  dtype, attention, remat, drop_path."""
  cfg = config.model  # .get: configs recorded before a field existed ran with its default
  return dict(dtype=_dtype(cfg.get("dtype", "float32")), attention=cfg.get("attention", "auto"),
              remat=cfg.get("remat", "none"), drop_path=cfg.get("drop_path", 0.0))


def _build(config, rng: jax.Array) -> tuple[ViT, checkpoints.Pretrained]:
  cfg, num_classes = config.model, config.data.num_classes
  runtime = runtime_fields(config)
  if checkpoint_name(cfg) == "random":
    kwargs = {**ARCHITECTURE_DEFAULTS, **variant(cfg.variant), **cfg.get("overrides", {})}
    if cfg.image_size < kwargs["patch_size"] or cfg.image_size % kwargs["patch_size"]:
      raise ValueError(f"model.image_size {cfg.image_size} is not a positive multiple of the "
                       f"patch size {kwargs['patch_size']}")
    grid = cfg.image_size // kwargs["patch_size"]
    kwargs["posemb_grid"] = (grid, grid)
    if cfg.get("pool"):
      kwargs["pool"] = cfg.pool
    mean, std = pixel_stats(cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = ViT(num_classes=num_classes, **kwargs, **runtime, pixel_mean=mean, pixel_std=std)
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    params = jax.jit(model.init)(rng, images)["params"]
    return model, checkpoints.Pretrained(params, kwargs, mean, std, f"random {cfg.variant}")
  path = cfg.checkpoint
  if path == "default":  # the bundled backbone, prepared on first use
    path = assets.default_backbone()
  pre = checkpoints.load(path, num_classes=num_classes, image_size=cfg.image_size,
                         pool=cfg.get("pool") or None, reset_head=cfg.get("reset_head", False),
                         drop_pre_logits=not cfg.get("pre_logits", True))
  mean, std = pixel_stats(cfg, pre.mean, pre.std)
  pre = dataclasses.replace(pre, mean=mean, std=std)
  return checkpoints.build_model(pre, num_classes=num_classes, **runtime), pre


def pixel_stats(cfg, mean, std) -> tuple[tuple, tuple]:
  """The checkpoint's input normalisation ``mean`` / ``std``, or ``cfg.pixel_mean`` /
  ``pixel_std`` (a config's ``model``) instead."""
  want_mean, want_std = cfg.get("pixel_mean"), cfg.get("pixel_std")
  if want_mean is None and want_std is None:
    return tuple(mean), tuple(std)
  if want_mean is None or want_std is None or len(want_mean) != 3 or len(want_std) != 3:
    raise ValueError(f"model.pixel_mean and model.pixel_std must both be RGB triples; got "
                     f"{want_mean!r} and {want_std!r}")
  return tuple(map(float, want_mean)), tuple(map(float, want_std))
