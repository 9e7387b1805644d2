"""HydraLoRA: router, top-k, load-balancing loss, and the k-means + elbow choice of N."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydra_jax import adapters as ad
from hydra_jax.models import ViT


def test_router_weights_sum_to_one():
  x = jax.random.normal(jax.random.key(0), (4, 7, 16), jnp.bfloat16)
  router = jax.random.normal(jax.random.key(1), (16, 5))
  probs = ad.router_probs(x, router)
  assert probs.dtype == jnp.float32 and probs.shape == (4, 7, 5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


def test_top_k_keeps_k_largest_renormalised():
  probs = jnp.array([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]])
  w = ad.top_k_weights(probs, 2)
  np.testing.assert_allclose(w, [[0, 0.5 / 0.75, 0, 0.25 / 0.75], [0.4 / 0.7, 0.3 / 0.7, 0, 0]],
                             atol=1e-6)
  # top-1 keeps the raw probability (Switch): renormalised it would be 1, a constant
  np.testing.assert_allclose(ad.top_k_weights(probs, 1), [[0, .5, 0, 0], [.4, 0, 0, 0]], atol=1e-7)
  assert ad.top_k_weights(probs, None) is probs


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_the_router_learns_from_the_task_loss_at_every_top_k(top_k):
  x = jax.random.normal(jax.random.key(0), (8, 6))
  router = jax.random.normal(jax.random.key(1), (6, 3))
  target = jax.random.normal(jax.random.key(2), (8, 3))

  def loss(r):
    return jnp.sum(ad.top_k_weights(ad.router_probs(x, r), top_k) * target)

  assert float(jnp.abs(jax.grad(loss)(router)).max()) > 1e-3


def test_balance_loss_planted():
  probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
  # mean prob (0.7, 0.3), top-1 share (0.75, 0.25): 2 * (0.525 + 0.075) = 1.2
  np.testing.assert_allclose(ad.balance_loss(probs), 1.2, rtol=1e-6)
  np.testing.assert_allclose(ad.balance_loss(jnp.full((6, 3), 1 / 3)), 1.0, rtol=1e-6)
  # below the uniform routing's 1: mean prob (0.459, 0.541), top-1 share (0.9, 0.1)
  skewed = jnp.array([[0.51, 0.49]] * 9 + [[0.0, 1.0]])
  np.testing.assert_allclose(ad.balance_loss(skewed), 2 * (0.459 * 0.9 + 0.541 * 0.1), rtol=1e-6)


def test_balance_loss_in_forward_and_top_k_routing():
  model = ViT(num_classes=3, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2,
              posemb_grid=(4, 4))
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = model.init(jax.random.key(1), images)["params"]
  spec = ad.AdapterSpec("hydralora", top_k=1, balance_weight=0.05)
  adapters = ad.init(spec, params, jax.random.key(2))
  _, aux = ad.apply_intercepted(model, params, adapters, spec, images, record=True)
  assert len(aux["routing"]) == 4  # q and v of 2 blocks
  for w in aux["routing"].values():
    assert w.shape == (2, 17, 3)
    np.testing.assert_array_equal((w > 0).sum(-1), 1)
  loss = float(aux["balance_loss"])
  assert 0 < loss <= 0.05 * 3 + 1e-6  # N * sum_i p_i f_i lies in (0, N]
  _, fwd_aux = ad.forward(model, params, adapters, spec, images)
  np.testing.assert_allclose(fwd_aux["balance_loss"], loss, rtol=1e-6)


def _blobs(k, seed, n_per=60, dim=8):
  rng = np.random.default_rng(seed)
  centers = rng.normal(scale=10.0, size=(k, dim))
  return np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centers])


@pytest.mark.parametrize("planted", [2, 3, 4])
def test_kmeans_elbow_finds_planted_clusters(planted):
  for seed in range(5):
    x = _blobs(planted, seed)
    assert ad.choose_num_heads(x, k_range=range(1, 7), rng=jax.random.key(seed)) == planted


def test_kmeans_recovers_blobs():
  x = _blobs(3, 0)
  centers, labels, inertia = ad.kmeans(x, 3, 0)
  truth = np.repeat(np.arange(3), 60)
  # the same partition up to relabelling
  assert len({(a, b) for a, b in zip(labels, truth, strict=True)}) == 3
  assert inertia < ad.kmeans(x, 2, 0)[2]


def test_router_aux_survives_remat():
  kw = dict(num_classes=3, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2,
            posemb_grid=(4, 4))
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = ViT(**kw).init(jax.random.key(1), images)["params"]
  spec = ad.AdapterSpec("hydralora", balance_weight=0.1)
  adapters = ad.init(spec, params, jax.random.key(2))

  def balance(remat):
    model = ViT(**kw, remat=remat)
    return jax.jit(lambda a: ad.forward(model, params, a, spec, images)[1]["balance_loss"])

  losses = [balance(r)(adapters) for r in (False, True)]
  assert float(losses[0]) > 0
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
