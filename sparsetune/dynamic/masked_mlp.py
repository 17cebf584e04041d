"""An MLP that computes only the neurons a mask keeps, per token, as sparse matrix products.

The kept (token, neuron) pairs form a sparse CSR pattern P. Gate and up projections are
sampled dense-dense products (SDDMM): only the entries of x @ W^T at P are computed. The
activation runs on those values, and the down projection is a sparse x dense product, so a
dropped neuron's rows of W_gate / W_up and its column of W_down never enter the arithmetic
for that token. Nothing is computed densely and masked afterwards.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sparsetune.surgery.structure import readable_weight


def gathered_mlp(x: torch.Tensor, keep: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear,
                 activation) -> torch.Tensor:
    """x [..., d], keep [..., m] (bool) -> [..., d_out], computing only the kept neurons of each token."""
    shape = x.shape
    xs = x.reshape(-1, shape[-1])
    ks = keep.reshape(-1, keep.shape[-1])
    dtype = xs.dtype
    xs = xs.float()
    # in float32 whatever autocast says: mixed precision would cast the sparse products to bf16, which torch's
    # sparse kernels do not implement (addmm_out_sparse_csr_impl_mkl), and the figures are float32 measurements
    with warnings.catch_warnings(), torch.autocast(xs.device.type, enabled=False):
        warnings.simplefilter("ignore")  # torch marks sparse CSR as beta
        pattern = ks.to_sparse_csr()
        crow, col = pattern.crow_indices(), pattern.col_indices()
        zeros = torch.sparse_csr_tensor(crow, col, torch.zeros(col.shape[0], dtype=xs.dtype, device=xs.device),
                                        size=ks.shape)
        g = torch.sparse.sampled_addmm(zeros, xs, readable_weight(gate).float().t()).values()
        u = torch.sparse.sampled_addmm(zeros, xs, readable_weight(up).float().t()).values()
        if gate.bias is not None:
            g = g + gate.bias.float()[col]
        if up.bias is not None:
            u = u + up.bias.float()[col]
        a = torch.sparse_csr_tensor(crow, col, activation(g, u), size=ks.shape)
        out = torch.sparse.mm(a, readable_weight(down).float().t())
    if down.bias is not None:
        out = out + down.bias.float()
    return out.to(dtype).reshape(*shape[:-1], down.out_features)
