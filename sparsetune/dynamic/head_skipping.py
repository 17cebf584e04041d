"""Skipping attention heads per token, with and without writing their KV-cache entries.

A skipped (token t, head h) contributes no output for token t. Two ways to skip:
  kv_written  the head's key/value for token t are still computed and cached, so later tokens
              still attend to token t in head h (only the output is saved);
  kv_skipped  the head is not run for token t at all, so its key/value never reach the cache
              and no later token can attend to token t in head h: the information loss the
              dynamic-activation studies warn about.
Under grouped-query attention several query heads share one key/value head. An engine can only leave out a KV
entry that no query head needs, so a KV head's entry for token t is skipped only when every query head of its
group is dropped for t (`kv_written_mask`); a query head dropped alone still gives no output.
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


def kv_written_mask(head_mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, T, H] query-head mask -> [B, T, H]: True where the head's KV head is written for the token (any query
    head of its group runs). Query head h uses KV head h // (H / num_kv_heads), as transformers' repeat_kv lays out."""
    b, t, h = head_mask.shape
    groups = h // num_kv_heads
    per_kv = head_mask.view(b, t, num_kv_heads, groups).any(-1)
    return per_kv.repeat_interleave(groups, dim=-1)


def _forward(mode: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        head_mask = getattr(module, "sparsetune_head_mask", None)  # [B, T, H] bool, True = run the head
        if head_mask is not None and mode == "kv_skipped":
            b, h, t, _ = query.shape
            s = key.shape[2]
            causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
            allowed = causal[None, None] if attention_mask is None else attention_mask.bool()
            # key s is visible to head h only if its KV head was written at token s (some query head of the group
            # ran); a token always sees its own key when it runs the head.
            kv_heads = key.shape[1]
            written = kv_written_mask(head_mask, kv_heads).transpose(1, 2)[:, :, None, :]  # [B, H, 1, S]
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
