"""Skipping attention heads per token, with and without writing their KV-cache entries.

A skipped (token t, head h) contributes no output for token t. Two ways to skip:
  kv_written  the head's key/value for token t are still computed and cached, so later tokens
              still attend to token t in head h (only the output is saved);
  kv_skipped  the head is not run for token t at all, so its key/value never reach the cache
              and no later token can attend to token t in head h: the information loss the
              dynamic-activation studies warn about.
Implemented as an attention function registered with transformers; each attention module
reads its current mask [batch, tokens, heads] from `module.sparsetune_head_mask`.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

IMPL = {"kv_written": "sparsetune_heads_kv_written", "kv_skipped": "sparsetune_heads_kv_skipped"}


def _forward(mode: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        head_mask = getattr(module, "sparsetune_head_mask", None)  # [B, T, H] bool, True = run the head
        if head_mask is not None and mode == "kv_skipped":
            b, h, t, _ = query.shape
            s = key.shape[2]
            causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
            allowed = causal[None, None] if attention_mask is None else attention_mask.bool()
            # key s is visible to head h only if head h ran (wrote its KV) at token s;
            # a token always sees its own key when it runs the head.
            written = head_mask.transpose(1, 2)[:, :, None, :]  # [B, H, 1, S]
            own = torch.eye(t, s, dtype=torch.bool, device=query.device)[None, None]
            attention_mask = allowed & (written | own)
            kwargs["is_causal"] = False
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if head_mask is not None:
            out = out * head_mask[..., None].to(out.dtype)  # out: [B, T, H, D]
        return out, weights

    return attention


for _mode, _name in IMPL.items():
    AttentionInterface.register(_name, _forward(_mode))
    ALL_MASK_ATTENTION_FUNCTIONS.register(_name, sdpa_mask)


@contextlib.contextmanager
def head_skipping(model, mode: str):
    """Run `model` with the head-skipping attention of `mode` (masks are set per module by the caller)."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = IMPL[mode]
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]
