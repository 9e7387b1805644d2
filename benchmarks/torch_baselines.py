"""PyTorch baselines for hydra_jax: timm ViT + Hydra / PEFT LoRA / full / linear, timed.

Standalone (no hydra_jax import); needs torch, timm and peft. Random weights, synthetic batches
kept on the device, AdamW, cross-entropy. Prints one JSON line per configuration on stdout
(progress goes to stderr); a failing configuration prints a line with an "error" field and the
run goes on.

  python benchmarks/torch_baselines.py --batch 128   # default set, ViT-B/16 224, on cuda
  python benchmarks/torch_baselines.py --device cpu --model vit_tiny_patch16_224 --batch 2 --steps 2
  python benchmarks/torch_baselines.py --precision bf16 --configs hydra:eager,hydra:compile:noinfer

Configurations are adapter:mode[:noinfer] (mode eager or compile; noinfer skips that row's
inference timing, which under torch.compile costs one or two more compiles).

Precision (each row's ``compute`` field):
  autocast (default): float32 weights, matmuls in bf16 under torch.autocast on CUDA; timm's
    residual stream, LayerNorm and block outputs stay float32 (``bf16-autocast``; on CPU autocast
    is off: ``fp32``).
  bf16: the whole model (frozen weights, Hydra/LoRA factors, head) cast to bfloat16 and run
    without autocast, AdamW on the bf16 params (``bf16-pure``). hydra_jax's dtype=bfloat16 keeps
    the residual stream and LayerNorm outputs in bf16 too, but its params and optimizer in
    float32; pure bf16 here also halves the weights' and optimizer's bytes and loses small
    updates to rounding, so it is an upper bound on PyTorch's speed, not a training recipe.

The `hydra` adapter follows the official code (extremebird/Hydra, vtab1k/hydra.py): every block's
attn.proj and mlp.fc2 get a parallel branch on the layer input and a sequential branch on its
output, each up(dropout(down(.))) with biased nn.Linear factors, down xavier-uniform, up zeros, one
scale s.
"""

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback

import peft
import timm
import torch
from torch import nn
from torch.nn import functional as F

ADAPTERS = ("hydra", "lora", "full", "linear")
DEFAULT_CONFIGS = "hydra:eager,hydra:compile,lora:compile,full:eager,linear:eager"


class HydraLinear(nn.Module):
  """y0 = base(x); y = y0 + s * (up_p(drop(down_p(x))) + up_s(drop(down_s(y0)))); base frozen."""

  def __init__(self, base: nn.Linear, *, rank: int, scale: float, dropout: float):
    super().__init__()
    self.base, self.scale = base, scale
    self.par_down = nn.Linear(base.in_features, rank)
    self.par_up = nn.Linear(rank, base.out_features)
    self.seq_down = nn.Linear(base.out_features, rank)
    self.seq_up = nn.Linear(rank, base.out_features)
    self.drop = nn.Dropout(dropout)
    for down, up in ((self.par_down, self.par_up), (self.seq_down, self.seq_up)):
      nn.init.xavier_uniform_(down.weight)
      nn.init.zeros_(down.bias)
      nn.init.zeros_(up.weight)
      nn.init.zeros_(up.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
    y0 = self.base(x)
    par = self.par_up(self.drop(self.par_down(x)))
    seq = self.seq_up(self.drop(self.seq_down(y0)))
    return y0 + self.scale * (par + seq)

  @torch.no_grad()
  def merged(self) -> nn.Linear:
    """The exact merge in torch (out, in) layout: W' = W + s (U_p D_p + U_s D_s W), b' likewise."""
    w, b = self.base.weight, self.base.bias
    dp, ap, up, bp = self.par_down.weight, self.par_down.bias, self.par_up.weight, self.par_up.bias
    ds, as_, us, bs = self.seq_down.weight, self.seq_down.bias, self.seq_up.weight, self.seq_up.bias
    out = nn.Linear(self.base.in_features, self.base.out_features).to(w.device, w.dtype)
    out.weight.copy_(w + self.scale * (up @ dp + us @ ds @ w))
    out.bias.copy_(b + self.scale * (up @ ap + bp + us @ (ds @ b + as_) + bs))
    return out


def add_hydra(model: nn.Module, *, rank: int, scale: float, dropout: float) -> nn.Module:
  """Wraps attn.proj and mlp.fc2 of every timm Block in place; returns the model."""
  for block in model.blocks:
    block.attn.proj = HydraLinear(block.attn.proj, rank=rank, scale=scale, dropout=dropout)
    block.mlp.fc2 = HydraLinear(block.mlp.fc2, rank=rank, scale=scale, dropout=dropout)
  return model


def merge_hydra(model: nn.Module) -> nn.Module:
  """A copy of a Hydra-wrapped model with every HydraLinear folded back into a plain nn.Linear."""
  model = copy.deepcopy(model)
  for block in model.blocks:
    block.attn.proj = block.attn.proj.merged()
    block.mlp.fc2 = block.mlp.fc2.merged()
  return model


def build(args, adapter: str) -> tuple[nn.Module, nn.Module]:
  """Returns (train_model, base_model): the adapted model and the plain (= merged) architecture,
  both in bfloat16 with ``--precision bf16`` (adapters and head included), else float32."""
  if adapter not in ADAPTERS:
    raise ValueError(f"unknown adapter {adapter!r}; expected one of {ADAPTERS}")
  base = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
  model = copy.deepcopy(base)
  if adapter == "lora":
    cfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"])
    model = peft.get_peft_model(model, cfg)
  else:
    model.requires_grad_(adapter == "full")
    if adapter == "hydra":
      add_hydra(model, rank=args.rank, scale=args.scale, dropout=args.dropout)
    model.get_classifier().requires_grad_(True)
  dtype = _param_dtype(args)
  return model.to(dtype), base.to(dtype)


def _param_dtype(args) -> torch.dtype:
  return torch.bfloat16 if args.precision == "bf16" else torch.float32


def _autocast(device: torch.device, args):
  # bf16 autocast on CUDA; off on CPU, where bf16 matmuls without AMX are ~10x slower than fp32,
  # and off for --precision bf16, where everything is bf16 already.
  enabled = device.type == "cuda" and args.precision == "autocast"
  return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def compute_label(args, device: torch.device) -> str:
  """What each row's ``compute`` field says about its arithmetic."""
  if args.precision == "bf16":
    return "bf16-pure"
  return "bf16-autocast" if device.type == "cuda" else "fp32"


def _synced(device: torch.device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _time_steps(fn, batches, args, device) -> float:
  """Median seconds per step over args.repeats runs of args.steps steps (warm-up excluded)."""
  times = []
  for _ in range(args.repeats):
    _synced(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
      fn(*batches[i % len(batches)])
    _synced(device)
    times.append((time.perf_counter() - t0) / args.steps)
  return statistics.median(times)


def _warm(fn, batches, args, device) -> float:
  t0 = time.perf_counter()
  for i in range(args.warmup):
    fn(*batches[i % len(batches)])
  _synced(device)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  return time.perf_counter() - t0


def time_train(model, batches, args, device, compile_: bool) -> dict:
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=device.type == "cuda")
  fwd = torch.compile(model) if compile_ else model
  model.train()

  def step(images, labels):
    with _autocast(device, args):
      loss = F.cross_entropy(fwd(images).float(), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  warm_s = _warm(step, batches, args, device)
  sec = _time_steps(step, batches, args, device)
  peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
  return dict(img_per_s=round(args.batch / sec, 1), step_ms=round(sec * 1e3, 2),
              peak_mem_gib=None if peak is None else round(peak, 3), warmup_s=round(warm_s, 1),
              trainable_params=sum(p.numel() for p in params))


def time_infer(model, batches, args, device, compile_: bool) -> float:
  """Images per second of a no_grad forward in eval mode (bf16, as ``--precision`` says)."""
  model.eval()
  fwd = torch.compile(model) if compile_ else model

  @torch.no_grad()
  def step(images, _):
    with _autocast(device, args):
      fwd(images)

  _warm(step, batches, args, device)
  return round(args.batch / _time_steps(step, batches, args, device), 1)


def make_batches(args, model: nn.Module, device: torch.device, n: int = 3) -> list:
  size = model.patch_embed.img_size
  gen = torch.Generator(device="cpu").manual_seed(0)
  return [(torch.randn(args.batch, 3, *size, generator=gen).to(device, _param_dtype(args)),
           torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device))
          for _ in range(n)]


def _cleanup(device):
  gc.collect()
  torch._dynamo.reset()
  if device.type == "cuda":
    torch.cuda.empty_cache()


def parse_config(config: str) -> tuple[str, str, bool]:
  """'adapter:mode[:noinfer]' -> (adapter, mode, infer); mode defaults to eager."""
  adapter, *rest = config.split(":")
  mode = (rest.pop(0) if rest else "") or "eager"
  if adapter not in ADAPTERS or mode not in ("eager", "compile") or rest not in ([], ["noinfer"]):
    raise ValueError(f"bad configuration {config!r}; expected adapter:eager|compile[:noinfer] "
                     f"with adapter one of {ADAPTERS}")
  return adapter, mode, not rest


def run_config(args, adapter: str, mode: str, device, cache: dict, *, infer: bool) -> dict:
  compile_ = mode == "compile"
  model, base = build(args, adapter)
  model.to(device)
  batches = make_batches(args, base, device)
  out = time_train(model, batches, args, device, compile_)
  if infer:
    key = ("base", compile_)
    if key not in cache:  # the plain ViT: what a merged Hydra (or merged LoRA) model costs
      cache[key] = time_infer(base.to(device), batches, args, device, compile_)
    out["infer_merged_img_per_s"] = cache[key]
    if adapter in ("hydra", "lora"):  # the unmerged, adapter-wrapped forward
      out["infer_img_per_s"] = time_infer(model, batches, args, device, compile_)
    else:
      out["infer_img_per_s"] = cache[key]
  return out


@torch.no_grad()
def hydra_check(args, device) -> dict:
  """Zero-init wrapped model == base; with random factors, the merged model == the wrapped one."""
  base = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).to(device)
  base.eval()
  wrapped = add_hydra(copy.deepcopy(base), rank=args.rank, scale=args.scale, dropout=args.dropout)
  wrapped.to(device).eval()
  x = torch.randn(2, 3, *base.patch_embed.img_size, device=device)
  ref = base(x)
  init_err = ((wrapped(x) - ref).abs().max() / ref.abs().max()).item()
  for name, p in wrapped.named_parameters():
    if "_up." in name or "_down.bias" in name:
      p.normal_(0.0, 0.05)
  want = wrapped(x)
  got = merge_hydra(wrapped)(x)
  merge_err = ((got - want).abs().max() / want.abs().max()).item()
  changed = ((want - ref).abs().max() / ref.abs().max()).item()
  return dict(check="hydra", model=args.model, init_max_rel_err=init_err,
              merged_max_rel_err=merge_err, adapted_vs_base_rel_diff=changed)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="vit_base_patch16_224")
  p.add_argument("--configs", default=DEFAULT_CONFIGS,
                 help="comma list of adapter:eager|compile[:noinfer]")
  p.add_argument("--adapter", choices=ADAPTERS, help="one adapter (overrides --configs)")
  p.add_argument("--compile", action="store_true", help="with --adapter: use torch.compile")
  p.add_argument("--device", default="cuda")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--num-classes", type=int, default=100)
  p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--rank", type=int, default=2, help="Hydra rank of each branch")
  p.add_argument("--scale", type=float, default=1.0, help="Hydra scale s")
  p.add_argument("--dropout", type=float, default=0.0,
                 help="Hydra dropout between down and up (0: like hydra_jax.bench's hydra row)")
  p.add_argument("--precision", choices=("autocast", "bf16"), default="autocast",
                 help="autocast: fp32 weights, bf16 autocast on CUDA; bf16: the whole model and "
                      "AdamW in pure bf16, no autocast (an upper bound on PyTorch's speed)")
  p.add_argument("--no-infer", dest="infer", action="store_false",
                 help="skip inference timing (every configuration)")
  p.add_argument("--no-check", dest="check", action="store_false", help="skip the Hydra check")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  device = torch.device(args.device)
  configs = ([f"{args.adapter}:{'compile' if args.compile else 'eager'}"] if args.adapter
             else [c.strip() for c in args.configs.split(",") if c.strip()])
  parsed = [parse_config(c) for c in configs]  # a typo stops the run before any timing
  meta = dict(framework="torch", model=args.model, batch=args.batch,
              compute=compute_label(args, device), torch=torch.__version__,
              timm=timm.__version__, peft=peft.__version__,
              device=torch.cuda.get_device_name(device) if device.type == "cuda" else args.device)
  if args.check:
    try:
      print(json.dumps({**hydra_check(args, device), **meta}), flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on to the timings
      print(json.dumps(dict(check="hydra", error=f"{type(e).__name__}: {e}", **meta)), flush=True)
  if device.type == "cuda":  # after the fp32 check; the timed runs' matmuls are bf16 anyway
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  cache = {}
  for config, (adapter, mode, infer) in zip(configs, parsed, strict=True):
    row = dict(meta, adapter=adapter, compile=mode == "compile")
    if adapter == "hydra":
      row["dropout"] = args.dropout  # recorded: the like-for-like JAX row depends on it
    print(f"[torch_baselines] {config} ...", file=sys.stderr, flush=True)
    try:
      row.update(run_config(args, adapter, mode, device, cache, infer=infer and args.infer))
    except Exception as e:  # noqa: BLE001 - one failing configuration must not stop the others
      traceback.print_exc(file=sys.stderr)
      row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    print(json.dumps(row), flush=True)
    _cleanup(device)


if __name__ == "__main__":
  main()
