"""Preference losses for Social Reward training: the five of the paper's loss ablation (appendix B).

Every loss takes the L2-normalised embeddings of a batch of triplets, ``text`` (the prompt, the
anchor), ``pos`` (the preferred image) and ``neg`` (the other image), each [N, D], and returns
one loss value per triplet, [N]; the trainer averages them. ``s(t, x) = <t, x>`` is the cosine,
the score the social_reward scorer reports; ``τ`` is ``temperature``.

The paper names the losses and their test accuracies (triplet 69.7 %, InfoNCE 68.5 %,
contrastive 67.1 %, BCE 67 %, reweighted cross-entropy 65.9 %) but gives no formulas, and the
authors' code has only the triplet loss. The other four are our definitions, each a standard
form of its name; their docstrings give the formula.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

TRIPLET_MARGIN = 0.3  # the authors' TripletLoss(margin=0.3) in training; their README's 0.2 is an example only


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|^2`` per row."""
    return (a - b).pow(2).sum(dim=1)


def triplet_loss(text: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *, margin: float = TRIPLET_MARGIN, **_: object) -> torch.Tensor:
    """``relu(|t - p|^2 - |t - n|^2 + margin)``: the authors' ``TripletLoss`` (squared Euclidean
    distance on L2-normalised embeddings, margin 0.3). On unit vectors ``|a - b|^2 = 2 - 2 s(a, b)``,
    so this equals ``relu(2 (s(t, n) - s(t, p)) + margin)``."""
    return torch.relu(squared_distance(text, pos) - squared_distance(text, neg) + margin)


def _image_logits(text: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """``s(t_i, c_j) / τ`` for every prompt i and every image c of the batch, [N, 2N]: columns
    0..N-1 are the positives, N..2N-1 the negatives."""
    return text @ torch.cat([pos, neg]).T / temperature


def infonce_loss(text: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *, temperature: float, **_: object) -> torch.Tensor:
    """InfoNCE, prompt -> images: ``-log( exp(s(t_i, p_i)/τ) / Σ_c exp(s(t_i, c)/τ) )``, where c
    runs over the batch's 2N images (the prompt's own negative and every image of the other
    triplets are the negatives). In-batch on each process (no gather across processes)."""
    logits = _image_logits(text, pos, neg, temperature)
    target = torch.arange(len(text), device=text.device)
    return F.cross_entropy(logits, target, reduction="none")


def supervised_contrastive_loss(text: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *, temperature: float, **_: object) -> torch.Tensor:
    """Supervised contrastive (Khosla et al. 2020, the L_out form) with the label "preferred":
    every preferred image of the batch is a positive of every prompt,
    ``-1/N Σ_j log( exp(s(t_i, p_j)/τ) / Σ_c exp(s(t_i, c)/τ) )``, c over the batch's 2N images.
    It teaches what preferred images share, whatever their prompt."""
    log_prob = torch.log_softmax(_image_logits(text, pos, neg, temperature), dim=1)
    return -log_prob[:, : len(text)].mean(dim=1)


def binary_cross_entropy_loss(text: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *, temperature: float, **_: object) -> torch.Tensor:
    """Pointwise binary cross-entropy: each (prompt, image) pair is one example with
    ``P(preferred) = sigmoid(s(t, x) / τ)``, label 1 for the positive and 0 for the negative;
    per triplet ``(BCE(s(t, p)/τ, 1) + BCE(s(t, n)/τ, 0)) / 2``."""
    logits = torch.stack([(text * pos).sum(1), (text * neg).sum(1)], dim=1) / temperature
    labels = torch.tensor([1.0, 0.0], device=text.device).expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)


def reweighted_cross_entropy_loss(
    text: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *, temperature: float, weights: torch.Tensor | None = None, **_: object
) -> torch.Tensor:
    """Cross-entropy over the triplet's two images (the Bradley-Terry form of PickScore and
    ImageReward), ``-log( exp(s(t, p)/τ) / (exp(s(t, p)/τ) + exp(s(t, n)/τ)) ) = softplus((s(t, n) -
    s(t, p)) / τ)``, each triplet multiplied by its weight ``w = 1 / (triplets of its prompt)``
    rescaled to mean 1 over the training set, so that every prompt counts the same however
    many triplets it has (``weights``; all ones when not given)."""
    per_triplet = F.softplus(((text * neg).sum(1) - (text * pos).sum(1)) / temperature)
    return per_triplet if weights is None else per_triplet * weights.to(per_triplet.dtype)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "triplet": triplet_loss,
    "infonce": infonce_loss,
    "supcon": supervised_contrastive_loss,
    "bce": binary_cross_entropy_loss,
    "reweighted_ce": reweighted_cross_entropy_loss,
}

# the row label each loss gets in the ablation table (the paper's Table 7 wording)
LOSS_TITLES = {
    "triplet": "Triplet",
    "infonce": "InfoNCE",
    "supcon": "Supervised contrastive",
    "bce": "Binary cross-entropy",
    "reweighted_ce": "Reweighted cross-entropy",
}


def preference_loss(name: str, text: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, **settings: object) -> torch.Tensor:
    """Loss ``name`` per triplet [N], computed in fp32 whatever the embeddings' dtype."""
    return LOSSES[name](text.float(), pos.float(), neg.float(), **settings)


__all__ = ["LOSSES", "LOSS_TITLES", "TRIPLET_MARGIN", "preference_loss", "squared_distance"] + [f.__name__ for f in LOSSES.values()]
