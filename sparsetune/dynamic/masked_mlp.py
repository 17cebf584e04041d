"""An MLP that computes only the neurons a mask keeps: the weights of dropped neurons are never read.

For each token, the kept rows of W_gate and W_up and the kept columns of W_down are gathered
and multiplied; nothing is computed densely and masked afterwards. Tokens are processed in
chunks, padded to the chunk's largest kept count (padding slots read row 0 and are zeroed).
"""

from __future__ import annotations

import torch
from torch import nn


def gathered_mlp(x: torch.Tensor, keep: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear,
                 activation, chunk: int = 32) -> torch.Tensor:
    """x [..., d], keep [..., m] (bool) -> [..., d_out], computing only the kept neurons of each token."""
    shape = x.shape
    xs, ks = x.reshape(-1, shape[-1]), keep.reshape(-1, keep.shape[-1])
    out = xs.new_zeros(xs.shape[0], down.out_features)
    wg, wu, wd_t = gate.weight, up.weight, down.weight.t()  # [m, d], [m, d], [m, d_out]
    for start in range(0, xs.shape[0], chunk):
        x_c, k_c = xs[start:start + chunk], ks[start:start + chunk]
        counts = k_c.sum(-1)
        width = int(counts.max())
        if width == 0:
            continue
        # indices of kept neurons, left-aligned; padding slots point at neuron 0 and are zeroed below
        order = torch.argsort((~k_c).to(torch.int8), dim=-1, stable=True)[:, :width]
        valid = torch.arange(width, device=x.device)[None, :] < counts[:, None]
        idx = torch.where(valid, order, torch.zeros_like(order))
        g = torch.einsum("nkd,nd->nk", wg[idx], x_c)
        u = torch.einsum("nkd,nd->nk", wu[idx], x_c)
        if gate.bias is not None:
            g = g + gate.bias[idx]
        if up.bias is not None:
            u = u + up.bias[idx]
        a = activation(g, u) * valid
        out[start:start + chunk] = torch.einsum("nk,nko->no", a, wd_t[idx])
    if down.bias is not None:
        out = out + down.bias
    return out.reshape(*shape[:-1], down.out_features)
