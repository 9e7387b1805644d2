"""Vision Transformer (Flax linen) with big_vision parameter names.

Param tree ('/'-paths)::

  embedding/{kernel (P,P,3,D), bias}
  cls (1,1,D)                                   only with class_token=True
  registers (1,R,D)                             only with num_registers=R (DINOv2 with registers)
  pos_embedding (1, [1+] gh*gw, D)              the class token's first; registers get none
  embedding_norm/{scale,bias}                   only with pre_norm=True (CLIP's ln_pre)
  Transformer/encoderblock_{i}/LayerNorm_0
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}  kernel (D,H,Dh)
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out                kernel (H,Dh,D)
  Transformer/encoderblock_{i}/LayerScale_{0,1}/scale (D,)  only with layer_scale=True (DINOv2)
  Transformer/encoderblock_{i}/LayerNorm_1
  Transformer/encoderblock_{i}/MlpBlock_0/Dense_{0,1}   Dense_0 (D, 2M) with swiglu=True
  Transformer/encoder_norm                      only with fc_norm=False
  MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}   only with pool="map"
  pooled_norm/{scale,bias}                      only with fc_norm=True (timm's gap models)
  pre_logits/{kernel,bias}                      only with representation_size (i21k files)
  head/{kernel,bias}                            only with num_classes

big_vision's own files add their (1, N, D) position embedding before concatenating the class
token; the loaders store it here with a zero row for the class token, which is the same function.
Tokens run [class token, registers, patches]; the registers (Darcet et al. 2024, "Vision
Transformers Need Registers") join after the position embedding is added, and "gap" pools the
patch tokens only.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hydra_jax.models import posemb as posemb_lib
from hydra_jax.models.ops import LayerNorm, gelu, quick_gelu

SIZES = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}
PATCHES = (8, 14, 16, 32)
POOLS = ("tok", "gap", "tok+gap", "map")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the compute dtypes, by name
ATTENTIONS = ("auto", "xla", "cudnn")
# ViT.attention -> jax.nn.dot_product_attention's implementation, and the token multiple it needs
IMPLEMENTATION = {"xla": "xla", "cudnn": "cudnn"}
PAD_MULTIPLE = {"xla": 1, "cudnn": 16}
REMATS = ("none", "block", "dots")
DROP_PATH = "drop_path"  # the rng collection that switches stochastic depth on (training)
_REMAT_POLICY = {"block": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def resolve_attention(attention: str, dtype: Any) -> str:
  """"auto" -> "cudnn" where cuDNN's flash attention runs (an NVIDIA GPU of compute capability
  8.0 or later, bf16/fp16 compute), else "xla"; other values pass through."""
  if attention != "auto":
    return attention
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if not half or jax.default_backend() != "gpu":
    return "xla"
  capability = getattr(jax.devices()[0], "compute_capability", None)  # "9.0"; absent on ROCm
  return "cudnn" if capability and float(capability) >= 8.0 else "xla"


def variant(name: str) -> dict[str, Any]:
  """Model fields of a named size, e.g. ``variant("B/16")``."""
  m = re.fullmatch(r"(\w+)/(\d+)", name)
  if not m or m.group(1) not in SIZES or int(m.group(2)) not in PATCHES:
    raise ValueError(
        f"unknown ViT variant {name!r}; expected SIZE/PATCH with SIZE in {tuple(SIZES)} "
        f"and PATCH in {PATCHES}")
  return dict(SIZES[m.group(1)], patch_size=int(m.group(2)))


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth on a residual branch x (B, ...): each sample's branch is zeroed with
  probability ``rate``, the kept ones scaled by 1 / (1 - rate) (the expectation is unchanged)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def train_rngs(rng: jax.Array | None, *, train: bool) -> dict[str, jax.Array]:
  """``apply``'s rngs for a training forward: stochastic depth's key (a no-op for models
  without ``drop_path``); none for evaluation."""
  # far from the small integers the adapters' dropout folds in (layer indices)
  return {DROP_PATH: jax.random.fold_in(rng, 0x7FFFFFFF)} if train and rng is not None else {}


class _LayerScale(nn.Module):
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return x * scale.astype(x.dtype)


class _Attention(nn.Module):
  """Multi-head self-attention with (D, H, Dh) / (H, Dh, D) kernels, as in big_vision.

  cuDNN's flash attention needs the sequence a multiple of 16 tokens (ViT-B/16 has 197). The
  block's input is padded once, right after the LayerNorm (XLA fuses the pad into it), and the
  output cut once, before the residual add (fused there too); q, k, v and the out projection run
  on the padded rows and attention masks them by length. Padding each of q, k, v instead costs
  six extra passes per block. ``valid_tokens`` tells the adapters' activation path which rows
  are real (``adapters.intercept`` cuts router statistics and recorded outputs to them).
  """
  num_heads: int
  valid_tokens: int | None = None
  attention: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, kv=None):
    """Self-attention over x (B, T, D); with ``kv`` (B, S, D), x's tokens attend to kv's."""
    batch, tokens, width = x.shape  # tokens == valid_tokens (the block passes x.shape[1])
    multiple = PAD_MULTIPLE[self.attention] if kv is None else 1  # only self-attention pads
    padded = -(-tokens // multiple) * multiple
    if padded != tokens:
      x = jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0)))
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    kv = x if kv is None else kv
    q, k, v = dense("query")(x), dense("key")(kv), dense("value")(kv)
    lengths = None if padded == tokens else jnp.full((batch,), tokens, jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, implementation=IMPLEMENTATION[self.attention], query_seq_lengths=lengths,
        key_value_seq_lengths=lengths)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                          name="out")(out)
    return out if padded == tokens else out[:, :tokens]


class _MlpBlock(nn.Module):
  """Dense_0, GELU, Dense_1; with ``swiglu`` Dense_0 puts out [gate, value] (2 * mlp_dim) and
  Dense_1 reads silu(gate) * value."""
  mlp_dim: int
  gelu_approximate: bool = False
  swiglu: bool = False
  quick_gelu: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.Dense(self.mlp_dim * (2 if self.swiglu else 1), name="Dense_0", **kw)(x)
    if self.swiglu:
      gate, value = jnp.split(y, 2, axis=-1)
      y = nn.silu(gate) * value
    elif self.quick_gelu:
      y = quick_gelu(y)
    else:
      y = gelu(y, self.gelu_approximate)
    return nn.Dense(x.shape[-1], name="Dense_1", **kw)(y)


class _MAPHead(nn.Module):
  """Multihead attention pooling (big_vision ``MAPHead``, SigLIP): a learned probe token attends
  to every token, then a residual MLP; (B, T, D) -> (B, D)."""
  num_heads: int
  mlp_dim: int
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  quick_gelu: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]),
                       self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    y = _Attention(self.num_heads, name="MultiHeadDotProductAttention_0", **kw)(probe, kv=x)
    z = LayerNorm(epsilon=self.ln_eps, name="LayerNorm_0", **kw)(y)
    y = y + _MlpBlock(self.mlp_dim, self.gelu_approximate, quick_gelu=self.quick_gelu,
                      name="MlpBlock_0", **kw)(z)
    return y[:, 0]


class _EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  layer_scale: bool = False
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  swiglu: bool = False
  quick_gelu: bool = False
  attention: str = "xla"
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _residual(self, y):
    if self.drop_path and self.has_rng(DROP_PATH):
      return drop_path(y, self.drop_path, self.make_rng(DROP_PATH))
    return y

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = LayerNorm(epsilon=self.ln_eps, name="LayerNorm_0", **kw)(x)
    y = _Attention(self.num_heads, x.shape[1], self.attention,
                   name="MultiHeadDotProductAttention_0", **kw)(y)
    if self.layer_scale:
      y = _LayerScale(self.param_dtype, name="LayerScale_0")(y)
    x = x + self._residual(y)
    y = LayerNorm(epsilon=self.ln_eps, name="LayerNorm_1", **kw)(x)
    y = _MlpBlock(self.mlp_dim, self.gelu_approximate, self.swiglu, self.quick_gelu,
                  name="MlpBlock_0", **kw)(y)
    if self.layer_scale:
      y = _LayerScale(self.param_dtype, name="LayerScale_1")(y)
    return x + self._residual(y)


class _Encoder(nn.Module):
  depth: int
  block: dict[str, Any]
  ln_eps: float = 1e-6
  remat: str = "none"
  drop_path: float = 0.0
  final_norm: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    block_cls = _EncoderBlock
    if self.remat != "none":
      block_cls = nn.remat(_EncoderBlock, policy=_REMAT_POLICY[self.remat])
    for i in range(self.depth):  # stochastic depth rises linearly from 0 to drop_path (timm's)
      rate = self.drop_path * i / max(self.depth - 1, 1)
      x = block_cls(**self.block, ln_eps=self.ln_eps, drop_path=rate, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"encoderblock_{i}")(x)
    if not self.final_norm:
      return x
    return LayerNorm(epsilon=self.ln_eps, name="encoder_norm", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)


class ViT(nn.Module):
  """ViT over NHWC images; ``apply({"params": p}, images)`` gives (B, num_classes) logits.

  Attributes:
    num_classes: classes of the ``head``; None for no head (``__call__`` returns features).
    patch_size, width, depth, mlp_dim, num_heads: the size (see ``variant``).
    posemb_grid: (gh, gw) patch grid of the stored position embedding; other input sizes are
      resampled on the fly (resample once at load time to save the work).
    posemb_resample: how the position embedding is resampled to another grid, the convention
      of the checkpoint's own code (``posemb.RESAMPLES``): "bicubic" (PyTorch's, no antialias:
      Hugging Face ViT / DINOv2 / SigLIP), "bicubic_antialias" (timm, Hugging Face DINOv2 with
      registers) or "linear_zoom" (scipy's zoom, order 1: big_vision, Google's .npz files).
    class_token: prepend a learned ``cls`` token.
    num_registers: learned register tokens after the class token (no position embedding; not
      pooled by "gap").
    pool: "tok" (class token), "gap" (mean of patch tokens), "tok+gap" (both, concatenated) or
      "map" (multihead attention pooling over all tokens, SigLIP's head: ``MAPHead_0``).
    representation_size: width of the tanh ``pre_logits`` layer of the original i21k files.
    layer_scale: DINOv2's per-channel scales on both residual branches.
    fc_norm: the final LayerNorm normalises the pooled features (``pooled_norm``) instead of
      every token (``Transformer/encoder_norm``): timm's ``fc_norm``, which its avg-pooled
      models have. Not with pool "tok+gap" (two features side by side).
    ln_eps: LayerNorm epsilon (1e-6 Google and DINOv2, 1e-12 Hugging Face ViT).
    gelu_approximate: tanh GELU (Google files) instead of the exact erf GELU.
    quick_gelu: OpenAI CLIP's ``x * sigmoid(1.702 x)`` instead of GELU (blocks and MAP head).
    pre_norm: a LayerNorm (``embedding_norm``) on the tokens before the first block (CLIP's
      ``ln_pre``, timm's ``norm_pre``), after the position embedding and registers join.
    swiglu: the blocks' MLPs are SwiGLU (DINOv2 giant): ``Dense_0`` puts out a gate and a value
      (``mlp_dim`` each, packed in that order as timm's ``SwiGLUPacked`` and the DINOv2 files'
      ``weights_in``) and ``Dense_1`` reads silu(gate) * value. A MAP head's MLP stays GELU.
    attention: "xla" (runs everywhere), "cudnn" (GPU flash attention, padded to 16 tokens; bf16
      or fp16 compute) or "auto" (cudnn where it runs, else xla).
    pixel_mean, pixel_std: per-channel RGB statistics of the [0, 1] inputs the params expect;
      uint8 images are normalised with them on the device (``(x / 255 - mean) / std``, fused
      into the patch embedding), float images are taken as normalised already.
    remat: what the backward pass recomputes: "none"; "block" (each block from its input: least
      memory); "dots" (keep the matmul outputs, recompute the element-wise work). True / False
      mean "block" / "none".
    drop_path: stochastic depth of the last block; the rates rise linearly from 0 in the first
      (timm's schedule). Only active when ``apply`` gets a "drop_path" rng (``train_rngs``).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  num_classes: int | None = None
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  posemb_grid: tuple[int, int] = (14, 14)
  posemb_resample: str = posemb_lib.DEFAULT_RESAMPLE
  class_token: bool = True
  num_registers: int = 0
  pool: str = "tok"
  representation_size: int | None = None
  layer_scale: bool = False
  fc_norm: bool = False
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  quick_gelu: bool = False
  pre_norm: bool = False
  swiglu: bool = False
  attention: str = "auto"
  pixel_mean: tuple[float, float, float] | None = None
  pixel_std: tuple[float, float, float] | None = None
  remat: bool | str = "none"
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.pool not in POOLS:
      raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOLS}")
    posemb_lib.check_resample(self.posemb_resample)
    if self.attention not in ATTENTIONS:
      raise ValueError(f"unknown attention {self.attention!r}; expected one of {ATTENTIONS}")
    remat = {True: "block", False: "none"}.get(self.remat, self.remat)
    if remat not in REMATS:
      raise ValueError(f"unknown remat {self.remat!r}; expected one of {REMATS} or a bool")
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"drop_path {self.drop_path} must be in [0, 1)")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
    if self.num_registers < 0:
      raise ValueError(f"num_registers must be >= 0; got {self.num_registers}")
    if "tok" in self.pool and not self.class_token:
      raise ValueError(f"pool={self.pool!r} needs class_token=True")
    if self.quick_gelu and (self.gelu_approximate or self.swiglu):
      raise ValueError("quick_gelu=True is the MLP's activation; it excludes gelu_approximate and "
                       f"swiglu (got gelu_approximate={self.gelu_approximate}, "
                       f"swiglu={self.swiglu})")
    if self.fc_norm and self.pool == "tok+gap":
      raise ValueError("fc_norm=True normalises one pooled feature; pool 'tok+gap' concatenates "
                       "two: pool with 'tok', 'gap' or 'map'")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p, d = self.patch_size, self.width
    self.embedding = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", **kw)
    if self.class_token:
      self.cls = self.param("cls", nn.initializers.zeros, (1, 1, d), self.param_dtype)
    if self.num_registers:
      self.registers = self.param("registers", nn.initializers.normal(0.02),
                                  (1, self.num_registers, d), self.param_dtype)
    tokens = self.posemb_grid[0] * self.posemb_grid[1] + int(self.class_token)
    self.pos_embedding = self.param(
        "pos_embedding", nn.initializers.normal(0.02), (1, tokens, d), self.param_dtype)
    if self.pre_norm:
      self.embedding_norm = LayerNorm(epsilon=self.ln_eps, **kw)
    block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, layer_scale=self.layer_scale,
                 gelu_approximate=self.gelu_approximate, swiglu=self.swiglu,
                 quick_gelu=self.quick_gelu,
                 attention=resolve_attention(self.attention, self.dtype))
    self.Transformer = _Encoder(self.depth, block, self.ln_eps, remat, self.drop_path,
                                final_norm=not self.fc_norm, **kw)
    if self.fc_norm:
      self.pooled_norm = LayerNorm(epsilon=self.ln_eps, **kw)
    if self.pool == "map":
      self.MAPHead_0 = _MAPHead(self.num_heads, self.mlp_dim, self.ln_eps, self.gelu_approximate,
                                self.quick_gelu, **kw)
    if self.representation_size:
      self.pre_logits = nn.Dense(self.representation_size, **kw)
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                           param_dtype=self.param_dtype)

  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 RGB (B, H, W, 3) -> float32 ``(x / 255 - pixel_mean) / pixel_std``."""
    if self.pixel_mean is None or self.pixel_std is None:
      raise ValueError("uint8 images need ViT(pixel_mean=..., pixel_std=...) (checkpoints."
                       "build_model sets them from the checkpoint); or pass normalised floats")
    mean = jnp.asarray(self.pixel_mean, jnp.float32)
    std = jnp.asarray(self.pixel_std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std

  def encode(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) images (normalised floats, or uint8 RGB) -> (B, T, D) final states (normed,
    unless ``fc_norm``: then the norm follows the pooling)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3); got shape {images.shape}")
    if min(images.shape[1:3]) < self.patch_size:  # (a remainder is left out, as a strided
      # convolution leaves it: SigLIP's 384 px at patch 14 is a 27 x 27 grid)
      raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} pixels are smaller than "
                       f"one patch of {self.patch_size}")
    if images.dtype == jnp.uint8:
      images = self.normalize(images)
    x = self.embedding(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    pos = posemb_lib.resample_posemb(
        self.pos_embedding, num_prefix=int(self.class_token), old_hw=self.posemb_grid,
        new_hw=(gh, gw), method=self.posemb_resample)
    if self.class_token:
      x = jnp.concatenate([jnp.broadcast_to(self.cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + pos.astype(x.dtype)
    if self.num_registers:
      n = int(self.class_token)
      registers = jnp.broadcast_to(self.registers.astype(x.dtype), (b, self.num_registers, d))
      x = jnp.concatenate([x[:, :n], registers, x[:, n:]], axis=1)
    if self.pre_norm:
      x = self.embedding_norm(x)
    return self.Transformer(x)

  def features(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B, F) pooled features (after ``pre_logits`` when present)."""
    x = self.encode(images)
    patches = x[:, int(self.class_token) + self.num_registers:]
    pooled = {"tok": lambda: x[:, 0], "gap": lambda: patches.mean(axis=1),
              "tok+gap": lambda: jnp.concatenate([x[:, 0], patches.mean(axis=1)], -1),
              "map": lambda: self.MAPHead_0(x)}
    x = pooled[self.pool]()
    if self.fc_norm:
      x = self.pooled_norm(x)
    if self.representation_size:
      x = jnp.tanh(self.pre_logits(x))
    return x

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) -> (B, num_classes) float32 logits, or features when num_classes is None."""
    x = self.features(images)
    if not self.num_classes:
      return x
    return self.head(x.astype(jnp.float32))


# What a checkpoint records of its model (the fields its params and function depend on; the rest
# are run-time choices), with the ViT's defaults for files and runs that recorded fewer. Also
# recorded, where a loader sets it: posemb_resample (absent: "bicubic", as older files mean).
ARCHITECTURE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ViT) if f.name in (
    "patch_size", "width", "depth", "mlp_dim", "num_heads", "posemb_grid", "class_token",
    "num_registers", "pool", "representation_size", "layer_scale", "fc_norm", "ln_eps",
    "gelu_approximate", "quick_gelu", "pre_norm", "swiglu")}


def param_count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
