"""Head activity: per token, how concentrated are the attention heads' output norms?

For each token, the heads' output norms (before o_proj) normalised to shares p_h. Reported per layer, averaged
over tokens (positions >= 1):

  top_quarter_share  the share of the norm carried by the top quarter of heads (a quarter when all heads are equal,
                     1 when a quarter of the heads carry everything)
  heads_for_90pct    the fraction of heads needed to carry 90% of the norm (small = few heads matter per token:
                     what skipping heads can exploit)
"""

from __future__ import annotations

import math

import torch


def layer_heads(norms: torch.Tensor) -> dict:
    """{'top_quarter_share', 'heads_for_90pct', 'uniform_top_quarter'} from one layer's [N, T, H] head norms."""
    h = norms.shape[-1]
    x = norms[:, 1:].reshape(-1, h).float()
    x = x[x.sum(-1) > 0]
    if x.numel() == 0:
        return {"top_quarter_share": None, "heads_for_90pct": None, "uniform_top_quarter": None}
    shares = (x / x.sum(-1, keepdim=True)).sort(dim=-1, descending=True).values
    quarter = max(1, math.ceil(h / 4))
    needed = (shares.cumsum(-1) < 0.9 - 1e-6).sum(-1) + 1
    return {"top_quarter_share": float(shares[:, :quarter].sum(-1).mean()),
            "heads_for_90pct": float(needed.float().mean() / h), "uniform_top_quarter": quarter / h}
