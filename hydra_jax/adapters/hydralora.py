"""HydraLoRA's router pieces and the k-means + elbow choice of its number of heads.

Routing: ``probs = softmax(x @ W_g)`` in float32, per token. With ``top_k`` each token keeps only
its k most likely heads (the dropped heads get no signal): for k >= 2 the kept weights are
renormalised to sum to one; k = 1 keeps the raw probability, as Switch Transformer's top-1 gate
does (renormalised, the weight would be exactly 1 and the router would learn nothing from the
task loss).

Load balancing (Switch Transformer): over all tokens of a layer,
``loss = N * sum_i mean_prob_i * frac_i`` with ``frac_i`` the share of tokens whose top-1 head is
i. It is 1 when routing is uniform and N when every token goes to the same head.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def router_probs(x: jax.Array, router: jax.Array) -> jax.Array:
  """Per-token routing probabilities.

  Args:
    x: (..., d_in) layer inputs.
    router: (d_in, N) router kernel W_g (no bias).

  Returns:
    (..., N) float32 softmax probabilities.
  """
  logits = x.astype(jnp.float32) @ router.astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


def top_k_weights(probs: jax.Array, k: int | None) -> jax.Array:
  """Keeps each token's k largest probabilities (exactly k, ties by index).

  Args:
    probs: (..., N) routing probabilities.
    k: heads kept per token; None (or N) keeps all and returns ``probs`` unchanged.

  Returns:
    (..., N) weights, zero outside the top k: renormalised to sum to one for k >= 2; for k = 1
    the kept probability itself (so that the router still gets a gradient).
  """
  n = probs.shape[-1]
  if k is None or k >= n:
    return probs
  _, idx = jax.lax.top_k(probs, k)
  mask = jax.nn.one_hot(idx, n, dtype=probs.dtype).sum(axis=-2)
  kept = probs * mask
  return kept if k == 1 else kept / kept.sum(axis=-1, keepdims=True)


def balance_loss(probs: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Switch-style load-balancing loss of one layer's routing.

  Args:
    probs: (..., N) routing probabilities of every token (before top-k).
    axis_name: under ``pmap``, the batch axis: the mean probabilities and the top-1 shares are
      averaged over it first, so every device computes the global batch's loss (as ``jit``).

  Returns:
    scalar float32 ``N * sum_i mean_prob_i * frac_i``.
  """
  n = probs.shape[-1]
  flat = probs.reshape(-1, n).astype(jnp.float32)
  frac = jax.nn.one_hot(jnp.argmax(flat, axis=-1), n, dtype=jnp.float32).mean(axis=0)
  mean_prob = flat.mean(axis=0)
  if axis_name is not None:
    mean_prob, frac = jax.lax.pmean((mean_prob, frac), axis_name)
  return n * jnp.sum(mean_prob * frac)


def _numpy_rng(rng) -> np.random.Generator:
  if isinstance(rng, (int, np.integer)):
    return np.random.default_rng(int(rng))
  if isinstance(rng, np.random.Generator):
    return rng
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return np.random.default_rng(np.asarray(rng, dtype=np.uint32).ravel().tolist())


def _sq_dists(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
  d = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None]
  return np.maximum(d, 0.0)


def _kmeans_pp(x: np.ndarray, k: int, gen: np.random.Generator) -> np.ndarray:
  """k-means++ seeding: each new center drawn with probability proportional to D(x)^2."""
  centers = [x[gen.integers(len(x))]]
  for _ in range(1, k):
    d = _sq_dists(x, np.stack(centers)).min(axis=1)
    p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1.0 / len(x))
    centers.append(x[gen.choice(len(x), p=p)])
  return np.stack(centers)


def kmeans(x, k: int, rng, *, restarts: int = 4, iters: int = 100):
  """Lloyd's k-means with k-means++ seeding; the best of ``restarts`` runs.

  Args:
    x: (n, d) points.
    k: number of clusters (<= n).
    rng: an int seed, numpy Generator or JAX PRNG key.

  Returns:
    (centers (k, d), labels (n,), inertia: float sum of squared distances to the centers).
  """
  x = np.asarray(x, np.float64)
  if not 1 <= k <= len(x):
    raise ValueError(f"kmeans needs 1 <= k <= n points; got k={k}, n={len(x)}")
  gen, best = _numpy_rng(rng), None
  for _ in range(restarts):
    centers = _kmeans_pp(x, k, gen)
    for _ in range(iters):
      labels = _sq_dists(x, centers).argmin(axis=1)
      new = np.stack([x[labels == j].mean(0) if np.any(labels == j) else centers[j]
                      for j in range(k)])
      if np.allclose(new, centers):
        break
      centers = new
    labels = _sq_dists(x, centers).argmin(axis=1)
    inertia = float(((x - centers[labels]) ** 2).sum())
    if best is None or inertia < best[2]:
      best = (centers, labels, inertia)
  return best


def elbow(ks: list[int], inertias: list[float]) -> int:
  """The k where the inertia curve bends most, on a log scale.

  Picks the interior k maximising the second difference ``log I(k-1) - 2 log I(k) + log I(k+1)``:
  a large relative drop up to k followed by a flat tail. The log makes it scale-free and, unlike
  a chord distance on the raw curve ("kneedle"), it is not fooled by clusters at unequal
  distances (a big early drop when two groups of clusters are far apart).

  Args:
    ks: consecutive increasing candidate k (at least 3).
    inertias: k-means inertia of each.
  """
  if len(ks) < 3:
    raise ValueError(f"the elbow method needs at least 3 values of k; got {list(ks)}")
  y = np.asarray(inertias, np.float64)
  logs = np.log(np.maximum(y, 1e-12 * max(y.max(), 1e-300)))
  bend = logs[:-2] - 2.0 * logs[1:-1] + logs[2:]
  return int(ks[1 + int(np.argmax(bend))])


def choose_num_heads(features, *, k_range: Iterable[int] = range(1, 7), rng) -> int:
  """HydraLoRA's N: k-means over ``features`` for every k in ``k_range``, then the elbow.

  Args:
    features: (n, d) per-example features (e.g. pooled frozen-backbone features of the train set).
    k_range: consecutive increasing candidate numbers of clusters, at least 3; the answer is
      never the first or the last (start at 1 to allow N = 2).
    rng: an int seed, numpy Generator or JAX PRNG key.

  Returns:
    the k at the elbow of the inertia curve.
  """
  ks = sorted(int(k) for k in k_range)
  gen = _numpy_rng(rng)
  inertias = [kmeans(features, k, gen)[2] for k in ks]
  return elbow(ks, inertias)
