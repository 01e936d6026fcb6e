"""Merge methods on LoRA factors (no Ray): exactness of stacked exports, Co-Merge choices, SVD errors,
peft equivalence and seeding, the diffusers file round trip, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import merge_utils

from safetydpo.config import DPOConfig, ModelConfig
from safetydpo.layout import LORA_WEIGHTS
from safetydpo.lora import add_lora, save_lora
from safetydpo.merge.calibration import CalibrationBatch, input_statistics
from safetydpo.merge.export import save_fused_pipeline
from safetydpo.merge.lora_file import ExpertLora, LoraFactors, MergeError, load_expert, save_merged
from safetydpo.merge.methods import compress, merge
from safetydpo.toyworld.models import build_unet, load_toy_pipeline

SHAPES = {"unet.x.attn1.to_q": (6, 5), "unet.x.attn2.to_k": (6, 7)}  # layer -> (out, in)


def _expert(name: str, seed: int, rank: int = 2, scale: float = 0.5, shapes=SHAPES) -> ExpertLora:
    g = torch.Generator().manual_seed(seed)
    return ExpertLora(name, {layer: LoraFactors(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g),
                                                scale) for layer, (o, i) in shapes.items()})


def _hand(name: str, delta: list[list[float]]) -> ExpertLora:
    """An expert whose only layer's delta is ``delta`` exactly (A = identity, scale 1)."""
    d = torch.tensor(delta)
    return ExpertLora(name, {"unet.l": LoraFactors(torch.eye(d.shape[1]), d, 1.0)})


def _dense(merged, layer: str) -> torch.Tensor:
    return merged.layers[layer].delta()


def _reference(experts, layer, w, m, rows: bool) -> torch.Tensor:
    """Co-Merge by brute force over the stacked deltas."""
    values = torch.stack([wi * e.layers[layer].delta() for wi, e in zip(w, experts.values(), strict=True)])
    activation = values.abs() * m.unsqueeze(1)
    if rows:
        pick = activation.sum(dim=2).argmax(dim=0)
        return values[pick, torch.arange(values.shape[1])]
    return values.gather(0, activation.argmax(dim=0, keepdim=True))[0]


# (1) linear / task arithmetic


def test_linear_of_one_expert_is_its_delta_exactly():
    expert = _expert("a", 0)
    merged = merge({"a": expert}, "linear")
    for layer, factors in expert.layers.items():
        assert torch.equal(_dense(merged, layer), factors.delta())
        assert merged.errors[layer] == 0.0


def test_average_of_identical_experts_is_each():
    experts = {n: _expert(n, 0) for n in "abc"}
    merged = merge(experts, "linear", weights=dict.fromkeys("abc", 1 / 3))
    for layer, factors in experts["a"].layers.items():
        torch.testing.assert_close(_dense(merged, layer), factors.delta(), atol=1e-6, rtol=1e-5)


def test_stacked_linear_export_is_exact_and_equals_task_arithmetic():
    experts = {"a": _expert("a", 0), "b": _expert("b", 1, scale=2.0), "c": _expert("c", 2)}
    weights = {"a": 0.5, "b": -1.0, "c": 2.0}
    merged = merge(experts, "linear", weights=weights, lam=0.7)
    for layer in SHAPES:
        expected = 0.7 * merge_utils.task_arithmetic([e.layers[layer].delta() for e in experts.values()],
                                                     torch.tensor(list(weights.values())))
        assert merged.layers[layer].rank == 6 and merged.errors[layer] == 0.0
        assert (_dense(merged, layer) - expected).abs().max() < 1e-5


# (2) Co-Merge


def test_weight_co_merge_picks_the_most_active_entry():
    experts = {"a": _hand("a", [[1, -3], [2, 0.5]]), "b": _hand("b", [[-2, 1], [1, 4]])}
    plain = merge(experts, "co_merge")  # m = 1: by magnitude
    torch.testing.assert_close(_dense(plain, "unet.l"), torch.tensor([[-2.0, -3], [2, 4]]))
    weighted = merge(experts, "co_merge", weights={"a": 3.0, "b": 1.0})  # the kept value is w_e dW_e
    torch.testing.assert_close(_dense(weighted, "unet.l"), torch.tensor([[3.0, -9], [6, 4]]))
    shared = merge(experts, "co_merge", input_norms={"unet.l": torch.tensor([10.0, 0.1])})
    torch.testing.assert_close(_dense(shared, "unet.l"), _dense(plain, "unet.l"))  # a column's m is common
    own = merge(experts, "co_merge", input_norms={"unet.l": torch.tensor([[1.0, 0.1], [1, 1]])})
    torch.testing.assert_close(_dense(own, "unet.l"), torch.tensor([[-2.0, 1], [2, 4]]))
    assert own.errors["unet.l"] < 1e-6  # 2x2 at default rank 4: the SVD keeps everything


def test_row_co_merge_takes_whole_rows_and_input_norms_change_them():
    experts = {"a": _hand("a", [[1, -3], [2, 0.5]]), "b": _hand("b", [[-2, 1], [1, 4]])}
    plain = merge(experts, "co_merge", granularity="row")
    torch.testing.assert_close(_dense(plain, "unet.l"), torch.tensor([[1.0, -3], [1, 4]]))
    base = merge(experts, "co_merge", granularity="row", input_norms={"unet.l": torch.tensor([10.0, 1])})
    torch.testing.assert_close(_dense(base, "unet.l"), torch.tensor([[-2.0, 1], [2, 0.5]]))
    assert base.layers["unet.l"].rank == 4 and base.errors["unet.l"] == 0.0


@pytest.mark.parametrize("granularity", ["weight", "row"])
def test_co_merge_matches_brute_force(granularity):
    experts = {n: _expert(n, i, scale=0.5 + i) for i, n in enumerate("abc")}
    w = [1.0, 0.5, 2.0]
    norms = {layer: torch.rand(3, i, generator=torch.Generator().manual_seed(7)) for layer, (_, i) in SHAPES.items()}
    merged = merge(experts, "co_merge", weights=dict(zip("abc", w, strict=True)), lam=0.5,
                   granularity=granularity, input_norms=norms, rank=6)
    for layer in SHAPES:
        expected = 0.5 * _reference(experts, layer, w, norms[layer], rows=granularity == "row")
        assert (_dense(merged, layer) - expected).abs().max() < 1e-5


def test_input_norms_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="input norms of unet.l"):
        merge({"a": _hand("a", [[1, 2]])}, "co_merge", input_norms={"unet.l": torch.ones(3)})


# (3) SVD compression


def test_compression_reports_the_relative_frobenius_error():
    delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    factors, error = compress(delta, 2)
    assert factors.rank == 2
    direct = float(torch.linalg.matrix_norm(delta - factors.delta()) / torch.linalg.matrix_norm(delta))
    assert 0.1 < error < 1 and error == pytest.approx(direct, rel=1e-4)
    full, zero = compress(delta, 6)
    assert zero < 1e-6 and (full.delta() - delta).abs().max() < 1e-5


def test_element_wise_merges_report_their_truncation_error():
    experts = {n: _expert(n, i) for i, n in enumerate("abc")}
    full = merge(experts, "ties", density=0.5, rank=6)
    low = merge(experts, "ties", density=0.5, rank=2)
    for layer in SHAPES:
        assert full.errors[layer] < 1e-6 and low.layers[layer].rank == 2
        dense = _dense(full, layer)
        direct = torch.linalg.matrix_norm(dense - _dense(low, layer)) / torch.linalg.matrix_norm(dense)
        assert low.errors[layer] == pytest.approx(float(direct), rel=1e-3)


# (4) TIES / DARE: peft's functions, seeded


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_peft_methods_are_reproducible_and_equal_peft(method):
    experts = {n: _expert(n, i) for i, n in enumerate("abc")}
    w = {"a": 1.0, "b": 0.5, "c": 2.0}
    state = torch.random.get_rng_state()
    first = merge(experts, method, weights=w, lam=0.8, density=0.6, rank=6, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the seed is scoped
    again = merge(experts, method, weights=w, lam=0.8, density=0.6, rank=6, seed=3)
    torch.manual_seed(3)  # merge draws layer after layer in the experts' layer order
    for layer in SHAPES:
        assert torch.equal(_dense(first, layer), _dense(again, layer))
        expected = 0.8 * getattr(merge_utils, method)([e.layers[layer].delta() for e in experts.values()],
                                                      torch.tensor(list(w.values())), 0.6)
        assert (_dense(first, layer) - expected).abs().max() < 1e-5
    if method != "ties":
        other = merge(experts, method, weights=w, density=0.6, rank=6, seed=4)
        assert not torch.allclose(_dense(other, "unet.x.attn1.to_q"), _dense(first, "unet.x.attn1.to_q"))


# (5) the diffusers file round trip


def _saved_expert(folder: Path, seed: int) -> UNet2DConditionModel:
    """A toy-UNet expert with alpha 8 on rank 4 (scale 2) and random B, saved by save_lora."""
    torch.manual_seed(seed)
    unet = build_unet()
    add_lora(unet, DPOConfig(lora_rank=4, lora_alpha=8))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    save_lora(unet, str(folder))
    return unet


def test_merged_file_loads_into_the_pipeline_with_the_merged_delta(tmp_path):
    unets = {n: _saved_expert(tmp_path / n, seed) for seed, n in enumerate("ab")}
    experts = {n: load_expert(n, str(tmp_path / n)) for n in "ab"}
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    module = unets["a"].get_submodule(layer.removeprefix("unet."))
    peft_delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
    assert experts["a"].layers[layer].scale == 2.0
    torch.testing.assert_close(experts["a"].layers[layer].delta(), peft_delta.detach())

    merged = merge(experts, "linear", weights={"a": 0.5, "b": 1.5}, lam=0.8)
    path = save_merged(merged, str(tmp_path / "merged"), {"method": "linear"})
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [LORA_WEIGHTS]  # no temp files left
    with safetensors.safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["safetydpo_merge"]) == {"method": "linear"}

    pipe = load_toy_pipeline()
    base = {k: pipe.unet.get_submodule(k.removeprefix("unet.")).weight.detach().clone() for k in merged.layers}
    pipe.load_lora_weights(str(tmp_path / "merged"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        for key, weight in base.items():
            module = pipe.unet.get_submodule(key.removeprefix("unet."))
            delta = 0.8 * (0.5 * experts["a"].layers[key].delta() + 1.5 * experts["b"].layers[key].delta())
            inputs = x[:, :weight.shape[1]]
            expected = F.linear(inputs, weight + delta, module.base_layer.bias)
            torch.testing.assert_close(module(inputs), expected, atol=1e-5, rtol=1e-4)



def test_a_merge_exports_as_a_full_pipeline_with_the_lora_fused(tmp_path):
    for seed, name in enumerate("ab"):
        _saved_expert(tmp_path / name, seed)
    experts = {n: load_expert(n, str(tmp_path / n)) for n in "ab"}
    save_merged(merge(experts, "linear", lam=0.7), str(tmp_path / "merged"))
    target = save_fused_pipeline(ModelConfig(pretrained="toy", dtype="float32"), str(tmp_path / "merged"))
    assert target == str(tmp_path / "merged" / "pipeline")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["pipeline", LORA_WEIGHTS]  # nothing left over

    fused = DiffusionPipeline.from_pretrained(target)
    assert not any("lora" in name for name, _ in fused.unet.named_parameters())  # plain weights, no adapter
    adapted = load_toy_pipeline()
    adapted.load_lora_weights(str(tmp_path / "merged"))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    states = torch.randn(2, 8, adapted.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = adapted.unet(latents, torch.tensor([100, 700]), encoder_hidden_states=states).sample
        got = fused.unet(latents, torch.tensor([100, 700]), encoder_hidden_states=states).sample
        plain = load_toy_pipeline().unet(latents, torch.tensor([100, 700]), encoder_hidden_states=states).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)  # the fused weights are not the base's

@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"alpha_pattern": {"attn2.to_k": 2}},
                                     {"rank_pattern": {"attn1.to_q": 2}}])
def test_expert_scales_are_peft_scalings(tmp_path, options):
    torch.manual_seed(0)
    unet = build_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"], **options))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    save_lora(unet, str(tmp_path))
    expert = load_expert("e", str(tmp_path))
    assert len(expert.layers) == sum(name.endswith((".to_q", ".to_k")) for name, _ in unet.named_modules())
    for key, factors in expert.layers.items():
        module = unet.get_submodule(key.removeprefix("unet."))
        expected = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        torch.testing.assert_close(factors.delta(), expected.detach())


# (6) refusals


def test_mismatched_experts_are_refused_naming_the_layer(tmp_path):
    a = _expert("a", 0)
    lower_rank = _expert("b", 1, rank=1)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=r"layer unet\.x\.attn1\.to_q: expert 'a' .* expert 'b'"):
        save_merged(merge({"a": a, "b": lower_rank}, "linear"), str(out))
    assert not out.exists()  # nothing written
    partial = _expert("c", 2, shapes={"unet.x.attn1.to_q": (6, 5)})
    with pytest.raises(MergeError, match=r"layer unet\.x\.attn2\.to_k: expert 'c' has no adapter"):
        merge({"a": a, "c": partial}, "ties")
    other_base = ExpertLora("d", a.layers, base_model="sd21")
    with pytest.raises(MergeError, match="different base models"):
        merge({"a": ExpertLora("a", a.layers, base_model="sd15"), "d": other_base}, "co_merge")


def test_unreadable_expert_files_are_refused_naming_the_expert(tmp_path):
    _saved_expert(tmp_path / "good", 0)
    data = (tmp_path / "good" / LORA_WEIGHTS).read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / LORA_WEIGHTS).write_bytes(data[: len(data) // 2])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / LORA_WEIGHTS).write_bytes(b"not a safetensors file")
    for name in ("cut", "junk", "missing"):
        with pytest.raises(MergeError, match=f"expert '{name}'"):
            load_expert(name, str(tmp_path / name))
    assert not (tmp_path / "missing").exists()


def test_regmean_is_the_least_squares_merge_on_the_layer_inputs() -> None:
    """One expert, no benign term, full-rank inputs: RegMean returns its delta. Two experts on disjoint input
    channels: each keeps its own effect on its inputs. A dominant benign term pulls the change to zero."""
    from safetydpo.merge.regmean import regmean

    one = {"a": _expert("a", 1)}
    full = {layer: torch.eye(i) for layer, (_, i) in SHAPES.items()}
    zero = {layer: torch.zeros(i, i) for layer, (_, i) in SHAPES.items()}
    alone = regmean(one, {"a": full}, zero, beta=0.0, ridge=0.0)
    for layer in SHAPES:
        assert torch.allclose(_dense(alone, layer), one["a"].layers[layer].delta(), atol=1e-4)

    two = {"a": _expert("a", 1), "b": _expert("b", 2)}
    mask = {layer: torch.arange(i) < i // 2 for layer, (_, i) in SHAPES.items()}
    grams = {"a": {layer: torch.diag(mask[layer].float()) for layer in SHAPES},
             "b": {layer: torch.diag((~mask[layer]).float()) for layer in SHAPES}}
    merged = regmean(two, grams, zero, beta=0.0, ridge=0.0)
    for layer in SHAPES:
        got = _dense(merged, layer)
        assert torch.allclose(got[:, mask[layer]], two["a"].layers[layer].delta()[:, mask[layer]], atol=1e-4)
        assert torch.allclose(got[:, ~mask[layer]], two["b"].layers[layer].delta()[:, ~mask[layer]], atol=1e-4)

    quiet = regmean(one, {"a": full}, full, beta=1e6)
    assert all(_dense(quiet, layer).abs().max() < 1e-4 for layer in SHAPES)


# (6) the calibration pass with each expert's own inputs


def test_own_input_statistics_in_one_batched_pass_equal_one_pass_per_expert(tmp_path):
    for seed, name in enumerate("ab"):
        _saved_expert(tmp_path / name, seed)
    pipe = load_toy_pipeline()
    for name in "ab":
        pipe.load_lora_weights(str(tmp_path / name), adapter_name=name)
    modules = [name for name, m in pipe.unet.named_modules() if name.endswith(("attn1.to_q", "attn2.to_k"))]
    generator = torch.Generator().manual_seed(0)
    batch = CalibrationBatch(torch.randn(5, 4, 8, 8, generator=generator), torch.tensor([10, 200, 400, 600, 900]),
                             torch.randn(5, 8, pipe.unet.config.cross_attention_dim, generator=generator))
    looped = []
    for name in "ab":
        pipe.set_adapters(name)
        looped.append(input_statistics(pipe.unet, modules, batch))
    pipe.set_adapters(["a", "b"])
    batched = input_statistics(pipe.unet, modules, batch, micro_batch=3, adapters=["a", "b"])
    for module in modules:
        assert batched[module].shape == (2, pipe.unet.get_submodule(module).in_features)
        torch.testing.assert_close(batched[module], torch.stack([m[module] for m in looped]))
    deep = [m for m in modules if m.endswith("attn1.to_q")][-1]  # a late self-attention sees each expert's own
    assert not torch.allclose(batched[deep][0], batched[deep][1])
