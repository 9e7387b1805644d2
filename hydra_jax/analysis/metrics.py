"""The numbers of the analysis, as pure numpy functions (float64) on matrices and activations.

Conventions: a layer computes ``y = x @ W`` with W flattened to (d_in, d_out), so a weight
change dW is (d_in, d_out) too. Its LEFT side (column space, ``range(dW)`` in R^{d_in}) is the
INPUT side: the input directions the change reads. Its RIGHT side (row space, in R^{d_out}) is
the OUTPUT side: the directions it writes. Hydra's sequential change ``dW_seq = s W A_s B_s``
has its column space inside ``range(W)`` (it reads the inputs only through W's own features);
its row space is ``span(B_s^T)``, unconstrained.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _f64(m) -> np.ndarray:
  return np.asarray(m, np.float64)


def frobenius(m) -> float:
  """||m||_F of an array of any shape."""
  return float(np.linalg.norm(_f64(m).ravel()))


def singular_values(m) -> np.ndarray:
  """Singular values (descending) of a (d_in, d_out) matrix."""
  return np.linalg.svd(_f64(m), compute_uv=False)


def effective_rank(s) -> float:
  """Entropy-based effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p = s / sum(s)``.

  Args:
    s: (n,) non-negative singular values.

  Returns:
    a value in [1, #nonzero s] (r for r equal values); 0.0 for an all-zero spectrum.
  """
  s = _f64(s)
  total = s.sum()
  if total <= 0:
    return 0.0
  p = s[s > 0] / total
  return float(np.exp(-(p * np.log(p)).sum()))


def top_k(fraction: float, w_shape: tuple[int, int]) -> int:
  """How many of W's singular directions "top" means: ``fraction`` of rank, at least one."""
  if not 0 < fraction <= 1:
    raise ValueError(f"top fraction must be in (0, 1]; got {fraction}")
  return max(1, int(round(fraction * min(w_shape))))


def singular_bases(w, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """W's top-k singular subspaces.

  Args:
    w: (d_in, d_out) frozen kernel.
    k: number of directions (<= min(d_in, d_out)).

  Returns:
    (U_k (d_in, k) input side, V_k (d_out, k) output side, all singular values (min(d_in, d_out),)).
  """
  u, s, vt = np.linalg.svd(_f64(w), full_matrices=False)
  if not 1 <= k <= len(s):
    raise ValueError(f"k={k} is outside [1, {len(s)}] for a kernel of shape {np.shape(w)}")
  return u[:, :k], vt[:k].T, s


def subspace_energy(dw, basis, *, side: str) -> float:
  """Fraction of dW's energy inside a subspace: ``||Q Q^T dW||^2 / ||dW||^2`` (left) or
  ``||dW Q Q^T||^2 / ||dW||^2`` (right).

  Args:
    dw: (d_in, d_out) weight change.
    basis: orthonormal basis Q, (d_in, k) for side "left", (d_out, k) for side "right".
    side: "left" (input side) or "right" (output side).

  Returns:
    a value in [0, 1]; k/d in expectation for an isotropic random dW; NaN for dW = 0.
  """
  dw, q = _f64(dw), _f64(basis)
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right'; got {side!r}")
  proj = q.T @ dw if side == "left" else dw @ q
  total = np.sum(dw * dw)
  return float(np.sum(proj * proj) / total) if total > 0 else float("nan")


def column_basis(m, *, rtol: float = 1e-5) -> np.ndarray:
  """Orthonormal basis (d, r) of ``range(m)``, r the numerical rank (s_i > rtol * s_1)."""
  u, s, _ = np.linalg.svd(_f64(m), full_matrices=False)
  if s.size == 0 or s[0] == 0:
    return u[:, :0]
  return u[:, : int(np.sum(s > rtol * s[0]))]


def principal_angles(a, b) -> np.ndarray:
  """Principal angles (degrees, ascending) between two subspaces given by orthonormal bases.

  Args:
    a: (d, p) orthonormal columns.
    b: (d, q) orthonormal columns.

  Returns:
    (min(p, q),) angles in [0, 90]: 0 for a shared direction, 90 for orthogonal ones.
  """
  cos = np.linalg.svd(_f64(a).T @ _f64(b), compute_uv=False)
  return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


def cosine_per_row(x, y, *, eps: float = 1e-12) -> np.ndarray:
  """Cosine similarity of matching rows of (n, d) x and y (0 where a row is zero)."""
  x, y = _f64(x), _f64(y)
  den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
  return np.sum(x * y, axis=-1) / np.maximum(den, eps)


def linear_cka(x, y) -> float:
  """Linear CKA (Kornblith et al. 2019) between (n, d1) and (n, d2) representations.

  ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred Xc, Yc. 1 for
  identical representations, invariant to orthogonal transforms and isotropic scaling of either.
  """
  m = Moments.of(x, y)
  return m.cka()


@dataclasses.dataclass
class Moments:
  """Centred second moments of paired rows (x, y), mergeable batch by batch (Chan et al.).

  Attributes:
    n: number of rows.
    mean_x, mean_y: (d1,), (d2,) means.
    cxx, cyy, cxy: (d1, d1), (d2, d2), (d1, d2) sums of centred outer products.
  """
  n: float
  mean_x: np.ndarray
  mean_y: np.ndarray
  cxx: np.ndarray
  cyy: np.ndarray
  cxy: np.ndarray

  @classmethod
  def of(cls, x, y) -> Moments:
    """Moments of (n, d1) x and (n, d2) y."""
    x, y = _f64(x), _f64(y)
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"x and y need the same number of rows; got {x.shape} and {y.shape}")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    return cls(float(x.shape[0]), mx, my, xc.T @ xc, yc.T @ yc, xc.T @ yc)

  def merge(self, other: Moments) -> Moments:
    """The moments of the union of both row sets."""
    n = self.n + other.n
    if other.n == 0:
      return self
    if self.n == 0:
      return other
    dx, dy, w = other.mean_x - self.mean_x, other.mean_y - self.mean_y, self.n * other.n / n
    return Moments(n, self.mean_x + dx * other.n / n, self.mean_y + dy * other.n / n,
                   self.cxx + other.cxx + w * np.outer(dx, dx),
                   self.cyy + other.cyy + w * np.outer(dy, dy),
                   self.cxy + other.cxy + w * np.outer(dx, dy))

  def cka(self) -> float:
    """Linear CKA of the rows seen so far (NaN when either side is constant)."""
    den = np.linalg.norm(self.cxx) * np.linalg.norm(self.cyy)
    return float(np.sum(self.cxy ** 2) / den) if den > 0 else float("nan")
