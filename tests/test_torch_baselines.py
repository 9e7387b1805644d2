"""benchmarks/torch_baselines.py on CPU: configuration strings and the pure-bf16 precision."""

import json

import pytest
import torch
from timm_import import import_timm

import_timm()  # before the script imports timm

from benchmarks import torch_baselines as tb  # noqa: E402

_TINY = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--batch", "2", "--steps", "1",
         "--repeats", "1", "--warmup", "1"]


def test_configurations_parse_and_refuse_by_name():
  assert tb.parse_config("hydra") == ("hydra", "eager", True)
  assert tb.parse_config("lora:compile:noinfer") == ("lora", "compile", False)
  for bad in ("nope:eager", "hydra:jit", "hydra:eager:x"):
    with pytest.raises(ValueError, match=f"bad configuration '{bad}'"):
      tb.parse_config(bad)


@pytest.mark.parametrize("adapter", tb.ADAPTERS)
def test_bf16_runs_the_whole_model_in_bf16(adapter):
  args = tb.parse_args([*_TINY, "--precision", "bf16"])
  model, base = tb.build(args, adapter)
  params = [*model.parameters(), *model.buffers(), *base.parameters()]
  assert {p.dtype for p in params} == {torch.bfloat16}  # frozen, adapters/LoRA and head
  outputs = []
  for module in model.modules():  # residual stream, LayerNorm and block outputs alike
    module.register_forward_hook(lambda m, i, o: outputs.append((type(m).__name__, o.dtype))
                                 if torch.is_tensor(o) else None)
  with torch.no_grad():
    model(tb.make_batches(args, base, torch.device("cpu"), n=1)[0][0])
  assert {"LayerNorm", "Block"} <= {name for name, _ in outputs}
  assert [o for o in outputs if o[1] != torch.bfloat16] == []


def test_bf16_rows_say_so(capsys):
  tb.main([*_TINY, "--precision", "bf16", "--no-check",
           "--configs", "hydra:eager,linear:eager:noinfer"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["adapter"], r["compute"]) for r in rows] == [("hydra", "bf16-pure"),
                                                         ("linear", "bf16-pure")]
  assert all("error" not in r and r["img_per_s"] > 0 for r in rows), rows
  assert rows[0]["infer_img_per_s"] > 0 and "infer_img_per_s" not in rows[1]
