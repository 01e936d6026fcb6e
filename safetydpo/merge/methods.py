"""Merge methods on the experts' per-layer weight changes ``dW_e = s_e B_e A_e`` (out x in, fp32).

Every method sees one layer at a time, so memory is that of one layer's N deltas, never all layers'.
Expert e has a weight ``w_e`` (default 1); ``lam`` scales the merged change of every method.

- ``linear``: ``sum_e w_e dW_e`` (task arithmetic: w_e = 1; average: w_e = 1/N); peft's
  ``task_arithmetic``, but built as the exact stacked factors below without forming any delta.
- ``ties``, ``dare_linear``, ``dare_ties``: peft's ``merge_utils`` functions of those names on the full
  deltas, with ``density`` the fraction of each expert's entries kept; DARE's random drop is seeded.
- ``co_merge``, defined below.

Co-Merge (our definition; the SafetyDPO paper gives no formula). For a layer ``y = W x``, expert e's
activation at weight position (j, k) is

    a_e[j, k] = |w_e dW_e[j, k]| * m_e[k],    m_e[k] = mean over calibration inputs of |x_k|,

the mean magnitude of input channel k at this layer's input (over samples, tokens and timesteps), so
``a_e[j, k]`` is the mean magnitude that position (j, k) of expert e adds to output j. ``m`` is either
shared by all experts (measured on the base model, "base" source; a tensor (in,)) or each expert's own
(measured with that expert applied, "own" source; a tensor (N, in), rows in the experts' order); without
norms m = 1 and the choice is by magnitude alone. The most active expert is kept:

- granularity ``weight``: ``M[j, k] = w_e dW_e[j, k]`` with e = argmax_e a_e[j, k];
- granularity ``row``: ``M[j, :] = w_e dW_e[j, :]`` with e = argmax_e sum_k a_e[j, k] (whole output units).

Ties go to the expert listed first. The merged change is ``lam * M``. Note that shared ("base") norms
scale a column equally for every expert, so they cannot change a ``weight``-granularity choice; they
matter for ``row`` granularity (they weight the sum over k) and per-expert ("own") norms matter for both.

Export: linear and row Co-Merge are exactly ``B A`` with the experts' factors stacked,
``B = lam [w_1 s_1 B_1 | ... | w_N s_N B_N]`` (row Co-Merge zeroes each B_e's rows that e did not win)
and ``A = [A_1; ...; A_N]``, rank N r. The element-wise results (weight Co-Merge, TIES, DARE) are full
rank and are truncated by SVD to ``rank``; their relative Frobenius error is reported per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, get_args

import torch
from peft.utils import merge_utils

from safetydpo.merge.lora_file import ExpertLora, LoraFactors, MergedLora, MergeError

Method = Literal["co_merge", "linear", "ties", "dare_linear", "dare_ties"]
Granularity = Literal["weight", "row"]
METHODS: tuple[str, ...] = get_args(Method)
_PEFT: dict[str, Callable[..., torch.Tensor]] = {
    "ties": merge_utils.ties, "dare_linear": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties,
}


def check_compatible(experts: Mapping[str, ExpertLora]) -> list[str]:
    """The common layer keys, in the first expert's order; :class:`MergeError` naming the first mismatch.

    Experts must adapt the same layers with the same factor shapes (so the same ranks) and, where known,
    share a base model. Their alphas may differ: scales are folded in.
    """
    if not experts:
        raise MergeError("no experts to merge")
    known = {name: e.base_model for name, e in experts.items() if e.base_model is not None}
    if len(set(known.values())) > 1:
        raise MergeError(f"experts were trained on different base models: {known}")
    (first, reference), *others = experts.items()
    for layer in sorted(set().union(*(e.layers for e in experts.values()))):
        for name, expert in others:
            mine, theirs = reference.layers.get(layer), expert.layers.get(layer)
            if mine is None or theirs is None:
                lacking = first if mine is None else name
                raise MergeError(f"layer {layer}: expert {lacking!r} has no adapter there "
                                 f"(experts {first!r} and {name!r} target different layers)")
            if mine.A.shape != theirs.A.shape or mine.B.shape != theirs.B.shape:
                raise MergeError(f"layer {layer}: expert {first!r} has A {tuple(mine.A.shape)}, "
                                 f"B {tuple(mine.B.shape)} but expert {name!r} has A {tuple(theirs.A.shape)}, "
                                 f"B {tuple(theirs.B.shape)} (different rank or layer shape)")
    return list(reference.layers)


def _on(factors: LoraFactors, device: str | torch.device) -> LoraFactors:
    return LoraFactors(factors.A.to(device), factors.B.to(device), factors.scale)


def _stack(factors: list[LoraFactors], coef: torch.Tensor, winner: torch.Tensor | None = None) -> LoraFactors:
    """Exact factors of ``sum_e coef_e dW_e`` (rows j with ``winner[j] != e`` dropped from expert e's)."""
    Bs = []
    for e, f in enumerate(factors):
        B = coef[e] * f.scale * f.B
        Bs.append(B if winner is None else B * (winner == e).unsqueeze(1))
    return LoraFactors(torch.cat([f.A for f in factors]), torch.cat(Bs, dim=1))


def _norms(input_norms: Mapping[str, torch.Tensor] | None, layer: str, n: int, width: int) -> torch.Tensor:
    """Per-expert input-channel norms m (N x in) for ``layer``; ones without calibration."""
    if input_norms is None:
        return torch.ones(n, width)
    if layer not in input_norms:
        raise ValueError(f"no input norms for layer {layer}")
    m = input_norms[layer].float()
    m = m.expand(n, -1) if m.ndim == 1 else m
    if m.shape != (n, width) or bool((m < 0).any()):
        raise ValueError(f"input norms of {layer}: need non-negative ({width},) or ({n}, {width}), "
                         f"got {tuple(input_norms[layer].shape)}")
    return m


def _product(f: LoraFactors, out: torch.Tensor) -> torch.Tensor:
    """``B @ A`` (without the scale) written into ``out``: no allocation per expert, which dominated at N=100."""
    return torch.matmul(f.B.float(), f.A.float(), out=out)


def _row_winner(factors: list[LoraFactors], w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per output unit j, the expert with the largest ``sum_k a_e[j, k]`` (first on ties)."""
    buffer = factors[0].B.new_empty(factors[0].B.shape[0], factors[0].A.shape[1], dtype=torch.float32)
    scores = torch.stack([(w[e] * f.scale).abs() * (_product(f, buffer).abs_() @ m[e])
                          for e, f in enumerate(factors)])
    return scores.argmax(dim=0)


def _weight_co_merge(factors: list[LoraFactors], w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Element-wise ``w_e dW_e`` of the most active expert: a running argmax in four layer-sized buffers."""
    shape = (factors[0].B.shape[0], factors[0].A.shape[1])
    best, value, activation = (factors[0].B.new_zeros(shape, dtype=torch.float32) for _ in range(3))
    best_activation = torch.full_like(best, -1.0)  # below any activation: the first expert fills every entry
    take = torch.empty_like(best, dtype=torch.bool)
    for e, f in enumerate(factors):
        _product(f, value).mul_(w[e] * f.scale)
        torch.abs(value, out=activation).mul_(m[e])
        torch.gt(activation, best_activation, out=take)  # strict: ties stay with the earlier expert
        torch.where(take, value, best, out=best)
        torch.where(take, activation, best_activation, out=best_activation)
    return best


def compress(delta: torch.Tensor, rank: int) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` factors of ``delta`` (truncated SVD) and ``||delta - B A||_F / ||delta||_F``.

    The singular values are split evenly (B = U sqrt(S), A = sqrt(S) V^T) so neither factor dominates the
    range in fp16. The error is the norm of the dropped singular values (Eckart-Young); 0 for a zero delta.
    """
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    total = torch.linalg.vector_norm(S)
    error = float(torch.linalg.vector_norm(S[k:]) / total) if total > 0 else 0.0
    return LoraFactors((root.unsqueeze(1) * Vh[:k]).contiguous(), (U[:, :k] * root).contiguous()), error


def merge(experts: Mapping[str, ExpertLora], method: Method, *, weights: Mapping[str, float] | None = None,
          lam: float = 1.0, density: float = 0.5, granularity: Granularity = "weight",
          input_norms: Mapping[str, torch.Tensor] | None = None, rank: int | None = None,
          seed: int = 0, device: str | torch.device = "cpu") -> MergedLora:
    """Merge ``experts`` (name -> expert, in a fixed order) layer by layer with ``method``.

    ``weights``: per expert name (default 1 each). ``density``: fraction kept by TIES / DARE.
    ``granularity`` and ``input_norms`` (layer key -> (in,) or (N, in)): Co-Merge only. ``rank``: of the
    SVD export of element-wise results (default: the experts' total rank, the size of a stacked export).
    ``seed``: DARE's random drop, drawn in a forked RNG so global torch state is untouched (a given seed
    draws differently on CPU and GPU). ``device``: where each layer is merged (TIES over 100 experts is
    minutes on CPU); the result is on CPU.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose from {METHODS}")
    if granularity not in get_args(Granularity):
        raise ValueError(f"unknown Co-Merge granularity {granularity!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    layers = check_compatible(experts)
    names = list(experts)
    weights = dict.fromkeys(names, 1.0) if weights is None else weights
    if set(weights) != set(names):
        raise ValueError(f"weights are for {sorted(weights)} but the experts are {sorted(names)}")
    w = torch.tensor([float(weights[n]) for n in names], device=device)
    merged, errors = {}, {}
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        for layer in layers:
            factors = [_on(experts[n].layers[layer], device) for n in names]
            if method == "linear":
                merged[layer], errors[layer] = _stack(factors, lam * w), 0.0
                continue
            if method == "co_merge":
                m = _norms(input_norms, layer, len(names), factors[0].A.shape[1]).to(device)
                if granularity == "row":
                    merged[layer], errors[layer] = _stack(factors, lam * w, _row_winner(factors, w, m)), 0.0
                    continue
                delta = _weight_co_merge(factors, w, m)
            else:
                delta = _PEFT[method]([f.delta() for f in factors], w, density)
            merged[layer], errors[layer] = compress(lam * delta, rank or sum(f.rank for f in factors))
    return MergedLora({layer: _on(f, "cpu") for layer, f in merged.items()}, errors)
