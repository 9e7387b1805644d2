"""A finished LoRA run on disk, as the export CLI reads it (shared by the PEFT export tests)."""

import jax
import numpy as np

from configs import default
from hydra_jax import adapters, build, export


def as_if_trained(tree, seed: int):
  """Every leaf random and non-zero, as after training."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32) * 0.3, tree)


def finished_lora_run(workdir, seed: int):
  """Writes ``workdir/config.json`` (the testing config, LoRA) and the adapters export of a run
  whose adapters and head look trained; returns (base Pretrained, trainable, spec)."""
  config = default.get_testing_config()
  config.adapter.kind = "lora"
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  _, base = build.build_model(config, build.model_rng(config))
  spec = adapters.spec_from_config(config.adapter)
  trainable = as_if_trained({"adapters": adapters.init(spec, base.params, jax.random.key(seed)),
                             "params": {"head": base.params["head"]}}, seed)
  export.save_adapters(workdir / "export" / "adapters.safetensors", trainable, spec)
  return base, trainable, spec
