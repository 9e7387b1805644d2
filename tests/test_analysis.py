"""Adapter analysis: each number on planted cases, the ablation identity, the CLI end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from hydra_jax import adapters as ad
from hydra_jax import analysis, analyze, train_lib
from hydra_jax.analysis import activations, metrics, report, weights
from hydra_jax.loop import train_and_evaluate
from hydra_jax.models import ViT


def _orthonormal(rng, d, k):
  return np.linalg.qr(rng.normal(size=(d, k)))[0]


def test_effective_rank_planted():
  assert metrics.effective_rank([3.0, 3.0, 3.0, 0.0]) == pytest.approx(3.0)
  assert metrics.effective_rank([5.0, 0.0]) == pytest.approx(1.0)
  assert metrics.effective_rank([0.0, 0.0]) == 0.0
  assert 1.0 < metrics.effective_rank([4.0, 1.0]) < 2.0
  rng = np.random.default_rng(0)
  planted = _orthonormal(rng, 30, 4) @ np.diag([2.0, 2.0, 2.0, 2.0]) @ _orthonormal(rng, 20, 4).T
  assert metrics.effective_rank(metrics.singular_values(planted)) == pytest.approx(4.0, abs=1e-6)


def test_subspace_energy_planted_inside_top_k_scores_one():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(60, 40))
  u_k, v_k, _ = metrics.singular_bases(w, 6)
  inside_left = u_k @ rng.normal(size=(6, 40))  # columns in W's top-6 left subspace
  inside_right = rng.normal(size=(60, 6)) @ v_k.T  # rows in W's top-6 right subspace
  assert metrics.subspace_energy(inside_left, u_k, side="left") == pytest.approx(1.0)
  assert metrics.subspace_energy(inside_right, v_k, side="right") == pytest.approx(1.0)
  # outside: the complement of U_k scores 0
  u_full = np.linalg.svd(w, full_matrices=True)[0]
  outside = u_full[:, 6:] @ rng.normal(size=(54, 40))
  assert metrics.subspace_energy(outside, u_k, side="left") == pytest.approx(0.0, abs=1e-12)
  angles = metrics.principal_angles(metrics.column_basis(inside_left), u_k)
  np.testing.assert_allclose(angles, 0.0, atol=1e-4)


def test_subspace_energy_of_random_dw_is_k_over_d():
  rng = np.random.default_rng(2)
  d_in, d_out, k = 400, 300, 40
  u_k, v_k, _ = metrics.singular_bases(rng.normal(size=(d_in, d_out)), k)
  dw = rng.normal(size=(d_in, d_out))
  assert metrics.subspace_energy(dw, u_k, side="left") == pytest.approx(k / d_in, abs=0.01)
  assert metrics.subspace_energy(dw, v_k, side="right") == pytest.approx(k / d_out, abs=0.01)
  with pytest.raises(ValueError, match="side"):
    metrics.subspace_energy(dw, u_k, side="top")


def test_principal_angles_planted():
  e = np.eye(4)
  np.testing.assert_allclose(metrics.principal_angles(e[:, [0, 1]], e[:, [0, 2]]), [0.0, 90.0])
  diag = (e[:, [0]] + e[:, [1]]) / np.sqrt(2)
  np.testing.assert_allclose(metrics.principal_angles(diag, e[:, [0]]), [45.0])


def _hydra_factors(rng, d_in, d_out, r=2):
  return {k: rng.normal(size=s).astype(np.float32) for k, s in
          dict(A_p=(d_in, r), B_p=(r, d_out), a_p=(r,), b_p=(d_out,),
               A_s=(d_out, r), B_s=(r, d_out), a_s=(r,), b_s=(d_out,)).items()}


def test_branch_deltas_and_sequential_column_space_in_range_w():
  """dW_par = s A_p B_p, dW_seq = s W A_s B_s; the latter's columns lie in range(W)."""
  rng = np.random.default_rng(3)
  d_in, d_out, s = 48, 12, 0.7  # an MLP Dense_1 shape: rank(W) = 12 < d_in
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  f = _hydra_factors(rng, d_in, d_out)
  deltas = weights.branch_deltas(f, w, ad.AdapterSpec("hydra", scale=s))
  np.testing.assert_allclose(deltas["parallel"], s * f["A_p"] @ f["B_p"], rtol=1e-5)
  np.testing.assert_allclose(deltas["sequential"], s * w @ f["A_s"] @ f["B_s"], rtol=1e-4,
                             atol=1e-5)
  range_w = metrics.column_basis(w)
  assert range_w.shape == (d_in, d_out)
  assert metrics.subspace_energy(deltas["sequential"], range_w, side="left") == pytest.approx(1.0)
  assert metrics.subspace_energy(deltas["parallel"], range_w, side="left") < 0.9  # ~d_out/d_in
  row = weights.analyze_layer("Transformer/encoderblock_3/MlpBlock_0/Dense_1", w, f,
                              ad.AdapterSpec("hydra", scale=s), top_fraction=0.25)
  assert (row["block"], row["type"], row["k"]) == (3, "mlp/Dense_1", 3)
  assert row["branches"]["sequential"]["energy_range_w"] == pytest.approx(1.0)
  assert row["branches"]["parallel"]["effective_rank"] <= 2.0 + 1e-9


def test_untrained_branch_has_zero_norm_and_no_alignment():
  rng = np.random.default_rng(7)
  f = _hydra_factors(rng, 16, 8)
  f["B_p"] = np.zeros_like(f["B_p"])
  row = weights.analyze_layer("head", rng.normal(size=(16, 8)), f, ad.AdapterSpec("hydra"),
                              top_fraction=0.5)
  par = row["branches"]["parallel"]
  assert (row["block"], par["norm"], par["effective_rank"], par["singular_values"]) == (
      None, 0.0, 0.0, [])
  assert np.isnan(par["energy_left"]) and np.isnan(par["angle_min"])
  assert row["branches"]["sequential"]["norm"] > 0


def test_cka_planted():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
  q = _orthonormal(rng, 16, 16)
  assert metrics.linear_cka(x, x) == pytest.approx(1.0)
  assert metrics.linear_cka(x, 3.5 * x @ q + 2.0) == pytest.approx(1.0)  # rotation, scale, shift
  assert metrics.linear_cka(rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))) < 0.02
  # against the kernel form of Kornblith et al.: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))
  a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 3))
  b[:, 0] += a[:, 0]
  h = np.eye(40) - 1 / 40
  hsic = lambda k, m: np.trace(k @ h @ m @ h)
  ka, kb = a @ a.T, b @ b.T
  assert metrics.linear_cka(a, b) == pytest.approx(hsic(ka, kb) / np.sqrt(hsic(ka, ka)
                                                                          * hsic(kb, kb)))


def test_moments_merge_equals_one_pass_with_a_large_offset():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(300, 6)) + 1e3, rng.normal(size=(300, 4)) - 50.0
  y[:, 0] += 0.3 * (x[:, 1] - 1e3)
  parts = [metrics.Moments.of(x[i:j], y[i:j]) for i, j in ((0, 7), (7, 150), (150, 300))]
  merged = parts[0].merge(parts[1]).merge(parts[2])
  whole = metrics.Moments.of(x, y)
  np.testing.assert_allclose(merged.cxy, whole.cxy, rtol=1e-8, atol=1e-6)
  assert merged.cka() == pytest.approx(whole.cka(), rel=1e-9)


def test_cosine_and_head_similarity_planted():
  x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
  y = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
  np.testing.assert_allclose(metrics.cosine_per_row(x, y), [1.0, -1.0, 0.0])
  rng = np.random.default_rng(6)
  b0 = rng.normal(size=(2, 5))
  sim = weights.head_similarity({"A": rng.normal(size=(7, 2)), "B": np.stack([b0, 3 * b0, -b0])})
  np.testing.assert_allclose(sim, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-12)


def test_router_usage_planted():
  routing = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
  usage, per_class = activations.router_usage(routing, np.array([0, 0, 1, 1]), 3)
  np.testing.assert_allclose(usage, [0.375, 0.625])
  np.testing.assert_allclose(per_class[:2], [[0.75, 0.25], [0.0, 1.0]])
  assert np.isnan(per_class[2]).all()


def test_depth_halves_hold_only_the_blocks_layers():
  """Layers after the blocks (MAP head, head) run late: in neither half, only in their own
  per-type group (they were counted as block 0's)."""
  names = [f"Transformer/encoderblock_{i}/MlpBlock_0/Dense_1" for i in range(4)] + [
      "MAPHead_0/MlpBlock_0/Dense_1", "head"]
  plans = activations.ablation_plans(names, ad.AdapterSpec("hydra"), ["parallel"], 4,
                                     weights.layer_info)
  groups = {group: sel for _, group, _, sel in plans}
  assert groups["blocks 0-1"] == {names[0], names[1]}
  assert groups["blocks 2-3"] == {names[2], names[3]}
  assert groups["all"] == set(names)


def test_a_set_of_layers_two_groups_share_is_ablated_once():
  """Hydra on one layer: "all", its type and its half are the same layer, ablated once."""
  name = "Transformer/encoderblock_1/MlpBlock_0/Dense_1"
  plans = activations.ablation_plans([name], ad.AdapterSpec("hydra"), ["parallel", "sequential"],
                                     2, weights.layer_info)
  assert [(b, g) for b, g, _, _ in plans] == [("parallel", "all"), ("sequential", "all")]


def test_analysis_json_writes_nan_and_inf_as_null():
  assert report._finite({"a": [float("nan"), 1.5, float("-inf")], "b": {"c": float("nan")},
                         "d": "x"}) == {"a": [None, 1.5, None], "b": {"c": None}, "d": "x"}


def test_heads_by_usage_renumbers_heads_without_changing_the_model(tiny):
  model, params, images = tiny
  spec = ad.AdapterSpec("hydralora", num_heads=3, top_k=2, bias=True)
  adapters = _random_adapters(spec, params, 5)
  batches = [{"image": images, "label": np.arange(3), "mask": np.ones(3, bool)}]
  stats = activations.output_stats(model, params, adapters, spec, batches)
  ordered, sorted_stats, order = activations.heads_by_usage(adapters, stats)
  assert any(o != [0, 1, 2] for o in order.values())  # the random router prefers some heads
  for path, f in ad.transform.factor_dicts(adapters):
    name, g = "/".join(path), ad.transform.get_path(ordered, path)
    usage = sorted_stats[name]["routing"].mean(0)
    assert (np.diff(usage) <= 0).all()
    np.testing.assert_array_equal(usage, stats[name]["routing"].mean(0)[order[name]])
    np.testing.assert_array_equal(g["B"], np.asarray(f["B"])[order[name]])
    np.testing.assert_array_equal(g["b"], np.asarray(f["b"])[order[name]])
    np.testing.assert_array_equal(g["router"], np.asarray(f["router"])[:, order[name]])
    np.testing.assert_array_equal(g["A"], f["A"])
  np.testing.assert_allclose(ad.forward(model, params, ordered, spec, images)[0],
                             ad.forward(model, params, adapters, spec, images)[0], atol=1e-5)
  again = activations.output_stats(model, params, ordered, spec, batches)  # as if saved so
  for name, s in again.items():
    np.testing.assert_allclose(sorted_stats[name]["routing"], s["routing"], atol=1e-6)
    assert sorted_stats[name]["output_norm"] == pytest.approx(s["output_norm"], rel=1e-5)


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_routing_entropy_is_the_routers_whatever_top_k(top_k):
  """A uniform router (zero weights) has entropy ln N; top_k only changes the weights applied."""
  model = ViT(num_classes=5, patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2,
              posemb_grid=(2, 2))
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.key(1), images)["params"]
  spec = ad.AdapterSpec("hydralora", num_heads=3, top_k=top_k)
  adapters = jax.tree.map(lambda x: x, ad.init(spec, params, jax.random.key(2)))
  for _, f in ad.transform.factor_dicts(adapters):
    f["router"] = jnp.zeros_like(f["router"])
  d_out = {name: int(np.prod(branches["head_0"].shape[2:]))
           for name, branches in ad.apply_intercepted(model, params, adapters, spec, images,
                                                      record=True)[1]["branches"].items()}
  stats = activations.batch_stats(model, spec, d_out, params, adapters, images,
                                  jnp.ones(2, bool))
  for s in stats.values():
    np.testing.assert_allclose(s["entropy"], np.log(3), rtol=1e-5)
    np.testing.assert_allclose(s["routing"].sum(-1), 1.0 if top_k != 1 else 1 / 3, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
  model = ViT(num_classes=5, patch_size=4, width=16, depth=2, mlp_dim=32, num_heads=2,
              posemb_grid=(2, 2))
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.key(1), images)["params"]
  params["head"]["kernel"] = jax.random.normal(jax.random.key(2), (16, 5))
  return model, params, images


def _random_adapters(spec, params, seed):
  adapters = ad.init(spec, params, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape)
                                   for k, x in zip(keys, leaves, strict=True)])


@pytest.mark.parametrize("branch", ["parallel", "sequential"])
def test_ablation_removes_exactly_the_branch_output(tiny, branch):
  """Only the head adapted: its output is the logits, so full - ablated == recorded branch."""
  model, params, images = tiny
  spec = ad.AdapterSpec("hydra", targets=("head",))
  adapters = _random_adapters(spec, params, 3)
  full, aux = ad.apply_intercepted(model, params, adapters, spec, images, record=True)
  ablated, _ = ad.apply_intercepted(model, params, analysis.ablate(adapters, spec, branch),
                                    spec, images)
  contribution = aux["branches"]["head"][branch]
  assert float(jnp.abs(contribution).max()) > 0.1
  np.testing.assert_allclose(full - ablated, contribution, atol=1e-5)


def test_ablating_a_layer_group_matches_disable(tiny):
  model, params, images = tiny
  spec = ad.AdapterSpec("hydra")
  adapters = _random_adapters(spec, params, 4)
  everywhere = analysis.ablate(adapters, spec, "sequential")
  off, _ = ad.apply_intercepted(model, params, adapters, spec, images, disable=("sequential",))
  np.testing.assert_allclose(ad.forward(model, params, everywhere, spec, images)[0], off,
                             atol=1e-5)
  mlp_only = analysis.ablate(adapters, spec, "parallel", lambda n: n.endswith("Dense_1"))
  _, aux = ad.apply_intercepted(model, params, mlp_only, spec, images, record=True)
  for name, branches in aux["branches"].items():
    zero = float(jnp.abs(branches["parallel"]).max()) == 0.0
    assert zero == name.endswith("Dense_1"), name
    assert float(jnp.abs(branches["sequential"]).max()) > 0
  with pytest.raises(ValueError, match="not a branch"):
    analysis.ablate(adapters, spec, "lora")


def _not_json(constant):
  raise ValueError(f"analysis.json holds {constant}, which strict JSON has not")


def _trained(tmp_path_factory, kind):
  workdir = tmp_path_factory.mktemp(kind)
  c = default.get_testing_config()
  c.adapter = default.adapter_config(kind)
  return workdir, train_and_evaluate(c, str(workdir))


@pytest.mark.slow
def test_cli_on_a_trained_hydra_run(tmp_path_factory):
  workdir, results = _trained(tmp_path_factory, "hydra")
  out = workdir / "analysis"
  analyze.main(["--workdir", str(workdir), "--num_examples", "64", "--out", str(out)])
  text = (out / "report.md").read_text()
  for section in ("## 1. Norms", "## 2. Spectra", "## 3. Alignment", "## 4. Branch similarity",
                  "## 5. Branch ablation", "## 6. HydraLoRA router\n\nSkipped"):
    assert section in text, section
  for png in ("norms_vs_depth", "effective_rank", "subspace_energy", "similarity_vs_depth",
              "ablation"):
    assert (out / "plots" / f"{png}.png").stat().st_size > 1000
    assert f"(plots/{png}.png)" in text
  summary = json.loads((out / "analysis.json").read_text(), parse_constant=_not_json)
  assert len(summary["layers"]) == 4  # attention out + Dense_1 of 2 blocks
  header = next(line for line in text.splitlines() if line.startswith("- kind:"))
  assert header.startswith("- kind: **hydra** (rank_parallel=2, rank_sequential=2, scale=")
  assert "bias=True" in header and "dropout=" in header and "rank=" not in header
  for row in summary["layers"]:
    seq = row["branches"]["sequential"]
    assert seq["energy_range_w"] == pytest.approx(1.0, abs=1e-6)  # columns in range(W)
    assert -1.0 <= row["cosine"] <= 1.0 and 0.0 <= row["cka"] <= 1.0 + 1e-9
  # the testing config evaluates the same 64 test images; merged vs unmerged may flip a tie
  assert summary["ablation"][0]["accuracy"] == pytest.approx(results["test_accuracy"], abs=1 / 64)
  assert len(summary["ablation"]) == 1 + 2 * 5  # full, 2 branches x (all, 2 types, 2 halves)


@pytest.mark.slow
def test_cli_on_a_trained_hydralora_run(tmp_path_factory):
  workdir, _ = _trained(tmp_path_factory, "hydralora")
  analyze.main(["--workdir", str(workdir), "--num_examples", "40"])
  text = (workdir / "report.md").read_text()
  assert "## 4. Branch similarity\n\nSkipped" in text
  assert "## 6. HydraLoRA router" in text and "head cos" in text
  for png in ("router_usage", "router_per_class", "ablation", "norms_vs_depth"):
    assert (workdir / "plots" / f"{png}.png").exists()
  layers = json.loads((workdir / "analysis.json").read_text(), parse_constant=_not_json)["layers"]
  for row in layers:
    assert sum(row["router_usage"]) == pytest.approx(1.0, abs=1e-5)
    assert (np.diff(row["router_usage"]) <= 0).all()  # heads renumbered by usage
    assert sorted(row["head_order"]) == [0, 1, 2]
    assert set(row["branches"]) == {"head_0", "head_1", "head_2"}
    assert 0.0 <= row["router_entropy"] <= np.log(3) + 1e-6
  # the fixed-routing merge: the factored model with the same fixed weights scores the same
  summary = json.loads((workdir / "analysis.json").read_text())
  fixed = summary["fixed_routing"]
  assert fixed["images"] == 40 and "mean routing weights over 40 training images" in text
  assert all(sum(w) == pytest.approx(1.0, abs=1e-5) for w in fixed["routing"].values())
  run = analysis.load_run(workdir)
  batches = report.eval_data(run, 40)
  fwd = jax.jit(lambda x: ad.apply_intercepted(run.model, run.params, run.adapters, run.spec, x,
                                               routing=fixed["routing"])[0])
  factored = train_lib.evaluate(lambda b: fwd(b["image"]), iter(batches))
  assert factored == pytest.approx(fixed["accuracy"], abs=1 / 40)  # a tie may flip
  # "head_0 off, all": each layer's most used head off, in the saved numbering head_order[0]
  first = {row["name"]: row["head_order"][0] for row in layers}
  off: dict = {}
  for path, f in ad.transform.factor_dicts(run.adapters):
    f = {**f, "B": jnp.asarray(f["B"]).at[first["/".join(path)]].set(0)}
    ad.transform.set_path(off, path, f)
  fwd_off = jax.jit(lambda x: ad.forward(run.model, run.params, off, run.spec, x)[0])
  row = next(r for r in summary["ablation"] if r["label"] == "head_0 off, all")
  assert train_lib.evaluate(lambda b: fwd_off(b["image"]), iter(batches)) == pytest.approx(
      row["accuracy"], abs=1 / 40)
  assert any(first.values())  # not every layer's saved head 0 (which would prove less)


@pytest.mark.parametrize("flag,value", [("--num_examples", "0"), ("--top_fraction", "0"),
                                        ("--top_fraction", "1.5")])
def test_cli_refuses_bad_numbers_before_loading_the_run(tmp_path, capsys, flag, value):
  with pytest.raises(SystemExit):
    analyze.main(["--workdir", str(tmp_path / "no_such_run"), flag, value])
  assert f"{flag} must be" in capsys.readouterr().err
