"""The step's FLOP count against XLA's count on CPU (where XLA counts every dot)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hydra_jax import adapters, bench, flops, train_lib
from hydra_jax.models import ViT


def _args(**kw):
  import argparse
  base = dict(model="Ti/16", batch=4, image_size=64, num_classes=10, dtype="float32",
              attention="xla", remat=False)
  return argparse.Namespace(**{**base, **kw})


def _xla_flops(args, name):
  model, spec, tx, schedule, state, frozen, counted = bench._setup(args, name)  # noqa: SLF001
  batch = {"image": jnp.zeros((args.batch, args.image_size, args.image_size, 3)),
           "label": jnp.zeros((args.batch,), jnp.int32)}
  step = jax.jit(functools.partial(train_lib.train_step, model=model, spec=spec, tx=tx,
                                   schedule=schedule))
  cost = step.lower(state, frozen, batch, jax.random.key(0)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return counted, cost["flops"]


@pytest.mark.parametrize("name", ["hydra", "hydra_dropout", "lora", "hydralora", "linear", "full"])
def test_counted_flops_match_xla_on_cpu(name):
  counted, xla = _xla_flops(_args(), name)
  # XLA also counts element-wise work (LayerNorm, GELU, softmax, Adam), a few percent here.
  assert 0.85 * xla < counted <= 1.02 * xla, (counted, xla)


def test_forward_of_b16_is_the_known_count():
  model = ViT(num_classes=1000, posemb_grid=(14, 14))  # B/16 defaults
  forward = flops.train_step_flops(model, 224, weight_grads=[])
  assert forward / 1e9 == pytest.approx(35.1, rel=0.01)  # ~2 x params x tokens + attention


def test_unknown_module_is_an_error():
  with pytest.raises(ValueError, match="name no matmul"):
    flops.train_step_flops(ViT(num_classes=10, posemb_grid=(2, 2)), 32, ["nope"])


def test_weight_grads_follow_the_path():
  params = jax.eval_shape(ViT(num_classes=10, width=32, depth=2, mlp_dim=64, num_heads=2,
                              patch_size=8, posemb_grid=(2, 2)).init,
                          jax.random.key(0), np.zeros((1, 16, 16, 3)))["params"]
  merged = bench._weight_grads(params, adapters.AdapterSpec(kind="hydra"), ["head/.*"])  # noqa: SLF001
  assert "Transformer/encoderblock_1/MlpBlock_0/Dense_1" in merged and "head" in merged
  dropout = bench._weight_grads(  # noqa: SLF001
      params, adapters.AdapterSpec(kind="hydra", dropout=0.1), ["head/.*"])
  assert dropout == ["head"]


@pytest.mark.parametrize("pool,registers,swiglu", [
    ("tok", 0, False), ("map", 0, False), ("tok+gap", 8, False), ("gap", 0, True)])
def test_forward_count_matches_xla_for_each_pooling(pool, registers, swiglu):
  model = ViT(num_classes=10, width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8,
              posemb_grid=(4, 4), pool=pool, class_token=pool != "map", num_registers=registers,
              swiglu=swiglu)
  images = jnp.zeros((1, 32, 32, 3))
  params = model.init(jax.random.key(0), images)["params"]
  cost = jax.jit(model.apply).lower({"params": params}, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  counted = flops.train_step_flops(model, 32, weight_grads=[])
  # XLA also counts LayerNorm / GELU / softmax work: a few percent at this width
  assert 0.85 * cost["flops"] < counted <= cost["flops"], (counted, cost["flops"])


@pytest.mark.parametrize("pool,trained", [
    ("map", "MAPHead_0/MultiHeadDotProductAttention_0/query"), ("tok", "pre_logits")])
def test_training_above_the_blocks_counts_the_gradient_through_what_follows(pool, trained):
  """Training a module after the blocks adds its weight gradient and the data gradients of the
  modules after it (MAP attention, MLP, head); XLA's extra count agrees (element-wise work
  cancels in the difference)."""
  model = ViT(num_classes=100, width=64, depth=1, mlp_dim=128, num_heads=4, patch_size=8,
              posemb_grid=(4, 4), pool=pool, class_token=pool == "tok",
              representation_size=256 if pool == "tok" else None)
  images = jnp.zeros((4, 32, 32, 3))  # batch > 1: XLA rewrites a dot over one row as a product
  flat = traverse_util.flatten_dict(model.init(jax.random.key(0), images)["params"], sep="/")

  def xla(modules):  # XLA's FLOPs of the loss gradient w.r.t. these modules' kernels
    names = [f"{m}/kernel" for m in modules]

    def loss(train, frozen, x):  # everything an argument: nothing for XLA to constant-fold
      params = traverse_util.unflatten_dict({**frozen, **train}, sep="/")
      return model.apply({"params": params}, x).sum()

    train = {k: flat[k] for k in names}
    frozen = {k: v for k, v in flat.items() if k not in train}
    cost = jax.jit(jax.grad(loss)).lower(train, frozen, images).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"] / len(images)

  counted = (flops.train_step_flops(model, 32, ["head", trained])
             - flops.train_step_flops(model, 32, ["head"]))
  assert counted == pytest.approx(xla(["head", trained]) - xla(["head"]), rel=0.12)
