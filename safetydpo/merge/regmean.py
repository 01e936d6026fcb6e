"""RegMean: the merged change that best reproduces each expert on its own category's inputs and leaves
benign inputs alone, layer by layer, in closed form.

For a layer ``y = W x`` with input Gram matrices ``G_e = mean x x^T`` over expert e's category and ``G_b``
over benign inputs (the safe twins), the merged change minimises

    sum_e || (dW - w_e dW_e) X_e ||^2  +  beta || dW X_b ||^2,

so ``dW = (sum_e w_e dW_e G_e) (sum_e G_e + beta G_b + eps I)^-1``, with ``eps`` a ridge of
``ridge`` x the mean diagonal (a category's inputs need not span every channel). Unlike Co-Merge and the
weight-space methods it uses what each layer actually receives: where categories' inputs differ, each
expert keeps its own effect; where an input is benign, the change is pulled to zero. (Jin et al., 2023,
"Dataless knowledge fusion by merging weights of language models", with the benign term added.)
The result is full rank and is exported by truncated SVD like the other element-wise methods.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from safetydpo.merge.lora_file import ExpertLora, MergedLora
from safetydpo.merge.methods import check_compatible, compress


def regmean(experts: Mapping[str, ExpertLora], grams: Mapping[str, Mapping[str, torch.Tensor]],
            benign: Mapping[str, torch.Tensor], *, weights: Mapping[str, float] | None = None, lam: float = 1.0,
            beta: float = 1.0, ridge: float = 1e-3, rank: int | None = None) -> MergedLora:
    """Merge ``experts`` with RegMean; ``grams``: expert name -> layer key -> ``G_e``; ``benign``: layer -> ``G_b``."""
    layers = check_compatible(experts)
    names = list(experts)
    weights = dict.fromkeys(names, 1.0) if weights is None else weights
    merged, errors = {}, {}
    for layer in layers:
        gram_sum = sum(grams[n][layer].float() for n in names) + beta * benign[layer].float()
        eps = ridge * float(gram_sum.diagonal().mean()) + 1e-12
        gram_sum = gram_sum + eps * torch.eye(gram_sum.shape[0])
        target = sum(weights[n] * experts[n].layers[layer].delta() @ grams[n][layer].float() for n in names)
        delta = torch.linalg.solve(gram_sum, target.T).T  # Gram matrices are symmetric
        total_rank = sum(experts[n].layers[layer].rank for n in names)
        merged[layer], errors[layer] = compress(lam * delta, rank or total_rank)
    return MergedLora(merged, errors)
