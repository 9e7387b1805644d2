"""optim: labels / split / join / report, and training adapters + head through optax.partition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hydra_jax import adapters as ad
from hydra_jax import optim
from hydra_jax.models import ViT

TRAINABLE = ("adapters/.*", "params/head/.*")


def test_labels_split_join_report():
  tree = {"params": {"head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
                     "body": {"kernel": jnp.ones((4, 3))}},
          "adapters": {"x": {"A": jnp.ones((4, 1))}}}
  lab = optim.labels(tree, TRAINABLE)
  assert lab["params"]["head"]["kernel"] == "trainable"
  assert lab["params"]["body"]["kernel"] == "frozen"
  assert lab["adapters"]["x"]["A"] == "trainable"
  train, frozen = optim.split(tree, TRAINABLE)
  assert set(train) == {"params", "adapters"} and set(train["params"]) == {"head"}
  assert frozen == {"params": {"body": tree["params"]["body"]}}
  assert jax.tree.structure(optim.join(train, frozen)) == jax.tree.structure(tree)
  text = optim.report(tree, TRAINABLE)
  assert "adapters/.*: 1 leaves, 4 params" in text and "params/head/.*: 2 leaves, 8 params" in text
  assert "trainable: 12 of 24 params" in text
  with pytest.raises(ValueError, match="params/pre_logits"):
    optim.labels(tree, TRAINABLE + ("params/pre_logits/.*",))
  with pytest.raises(ValueError, match="both"):
    optim.join(train, train)
  with pytest.raises(ValueError, match=r"trainable pattern 'head/\(\.\*' \(train_patterns\) is "
                                       "not a regular expression: missing \\)"):
    optim.split(tree, ("adapters/.*", "head/(.*"))


@pytest.fixture(scope="module")
def trained():
  model = ViT(num_classes=4, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2,
              posemb_grid=(4, 4))
  images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  labels = jnp.arange(8) % 4
  params = model.init(jax.random.key(1), images)["params"]
  spec = ad.AdapterSpec("hydra")
  tree = {"params": params, "adapters": ad.init(spec, params, jax.random.key(2))}
  tx = optim.masked(optax.adamw(1e-2, weight_decay=1e-4), optim.labels(tree, TRAINABLE))

  def loss_fn(t):
    logits, aux = ad.forward(model, t["params"], t["adapters"], spec, images)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + aux["balance_loss"]

  @jax.jit
  def step(t, state):
    grads = jax.grad(loss_fn)(t)
    updates, state = tx.update(grads, state, t)
    return optax.apply_updates(t, updates), state, grads

  state, t, grads = tx.init(tree), tree, []
  for _ in range(3):
    t, state, g = step(t, state)
    grads.append(g)
  return tree, t, state, grads


def test_frozen_unchanged_trainable_changed(trained):
  before, after, _, _ = trained
  for path, old in jax.tree_util.tree_leaves_with_path(before):
    new = after
    for k in path:
      new = new[k.key]
    name = jax.tree_util.keystr(path)
    if "'adapters'" in name and "'B_" in name or "'head'" in name:
      assert not np.array_equal(old, new), name
    elif "'params'" in name:
      np.testing.assert_array_equal(old, new, err_msg=name)


def test_optimizer_state_holds_trainable_leaves_only(trained):
  before, _, state, _ = trained
  train, _ = optim.split(before, TRAINABLE)
  trainable_shapes = sorted(x.shape for x in jax.tree.leaves(train))
  moments = [x.shape for x in jax.tree.leaves(state) if x.ndim > 0]
  assert sorted(moments) == sorted(trainable_shapes * 2)  # Adam's mu and nu, nothing frozen


def test_gradients_reach_both_hydra_branches(trained):
  _, _, _, grads = trained
  for _, f in ad.transform.factor_dicts(grads[-1]["adapters"]):
    for k in ("A_p", "B_p", "A_s", "B_s"):
      assert float(jnp.abs(f[k]).max()) > 0, k


def _official_vtab_lrs(lr, epochs, *, warmup=10, period=500, lr_min=1e-5, warmup_init=1e-6):
  """The lr of each epoch in the official Hydra VTAB-1k loop, written out independently: timm's
  CosineLRScheduler starts at warmup_lr_init and is stepped with the epoch index after each
  epoch (t in epochs, warm-up not a prefix of the cosine)."""
  def timm(t):
    if t < warmup:
      return warmup_init + t * (lr - warmup_init) / warmup
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / period))
  current, out = warmup_init, []
  for epoch in range(epochs):
    out.append(current)  # this epoch trains at the lr set after the previous one
    current = timm(epoch)
  return out


def test_timm_cosine_follows_the_official_vtab_loop():
  from configs import vtab1k
  from hydra_jax import train_lib

  config = vtab1k.get_config("cifar100").optim
  config.steps_per_epoch, config.num_epochs, config.warmup_steps, config.total_steps = (
      3, 100, 30, 300)
  schedule = train_lib.make_schedule(config)
  want = _official_vtab_lrs(config.lr, 100)
  got = [[float(schedule(e * 3 + i)) for i in range(3)] for e in range(100)]
  np.testing.assert_allclose(got, np.repeat(np.asarray(want)[:, None], 3, 1), rtol=1e-5)
  assert 0.9 < got[-1][0] / config.lr < 0.92  # barely decayed after 100 of 500 epochs
  config.cosine_epochs = 50
  with pytest.raises(ValueError, match="cosine_epochs must be >= num_epochs"):
    train_lib.make_schedule(config)
  config.schedule = "step"
  with pytest.raises(ValueError, match="unknown optim.schedule 'step'"):
    train_lib.make_schedule(config)
