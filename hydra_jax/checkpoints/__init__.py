"""Pre-trained ViT checkpoints: load (format auto-detected), convert, check strictly, save (also
as a Hugging Face transformers directory: ``save_hf``; as a timm directory: ``save_timm``; as a
big_vision ``.npz``: ``save_npz``); LoRA
adapters to and from Hugging Face PEFT (``save_peft``, ``load_peft``).

    pretrained = checkpoints.load("ViT-B_16.npz", num_classes=10, image_size=224)
    model = checkpoints.build_model(pretrained)
    logits = model.apply({"params": pretrained.params}, images)
"""

from __future__ import annotations

import pathlib

from hydra_jax.checkpoints import google, hf, native, timm_vit
from hydra_jax.checkpoints.common import (
    Pretrained,
    build_model,
    check_tree,
    expected_shapes,
    finalize,
)
from hydra_jax.checkpoints.google import save_npz
from hydra_jax.checkpoints.hf_export import save_hf
from hydra_jax.checkpoints.native import save
from hydra_jax.checkpoints.peft_lora import load_peft, save_peft
from hydra_jax.checkpoints.timm_vit import save_timm

FORMATS = (
    "hydra_jax safetensors (checkpoints.save)",
    "google-research/vision_transformer .npz",
    "big_vision .npz (also a two-tower SigLIP / LiT file's image tower)",
    "Hugging Face ViT/DINOv2/SigLIP/CLIP directory (config.json + *.safetensors)",
    "timm VisionTransformer directory (config.json + model.safetensors) or state-dict .safetensors",
)

__all__ = ["FORMATS", "Pretrained", "build_model", "check_tree", "expected_shapes", "load",
           "load_peft", "save", "save_hf", "save_npz", "save_peft", "save_timm"]


def _read(path: pathlib.Path) -> Pretrained:
  """Detects the format of ``path`` and converts it into the ViT layout."""
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}")
  if path.is_file() and (meta := native.metadata(path)) is not None:
    return native.load_native(path, meta)
  if (root := hf.hf_dir(path)) is not None:
    return hf.load_hf(root)
  if (timm := timm_vit.timm_source(path)) is not None:
    return timm_vit.load_timm(*timm)
  if path.is_file() and path.suffix == ".npz":
    arrays = google.read_npz(path)
    if google.is_vision_transformer(arrays):
      return google.load_vision_transformer(arrays, str(path))
    if google.is_big_vision(arrays):
      return google.load_big_vision(arrays, str(path))
  raise ValueError(f"{path} is not a checkpoint format hydra_jax reads; expected one of {FORMATS}")


def load(path, *, num_classes: int | None = None, reset_head: bool = False,
         image_size: int | tuple[int, int] | None = None, pool: str | None = None,
         drop_pre_logits: bool = False) -> Pretrained:
  """Loads a pre-trained ViT from any supported format into the ViT's param layout.

  Args:
    path: a native ``.safetensors`` file, a Google / big_vision ``.npz``, a Hugging Face
      ViT / DINOv2 / SigLIP / CLIP directory (or its ``model.safetensors``), or a timm
      VisionTransformer directory (or its ``model.safetensors``, or a bare state dict).
    num_classes: give the params a zero-initialised (features, num_classes) head; the file's head
      is kept only if it already has that shape and ``reset_head`` is False.
    reset_head: discard the file's head (replaced by a zero head when ``num_classes`` is set).
    image_size: int or (H, W): resample pos_embedding to that patch grid once (bicubic) and
      record the new ``model["posemb_grid"]``.
    pool: override the checkpoint's pooling ("tok", "gap", "tok+gap", "map"); the head then
      follows the new feature width.
    drop_pre_logits: remove the tanh ``pre_logits`` layer of the original i21k files.

  Returns:
    ``Pretrained`` with float32 numpy params that exactly fit ``build_model(pretrained)``.

  Raises:
    ValueError: unknown format, or ONE error listing every missing / unexpected / mis-shaped
      param after conversion.
  """
  raw = _read(pathlib.Path(path).expanduser())
  return finalize(raw, num_classes=num_classes, reset_head=reset_head, image_size=image_size,
                  pool=pool, drop_pre_logits=drop_pre_logits)
