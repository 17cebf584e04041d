"""Forward hooks that give the head predictors their inputs and labels from the normal forward pass."""

from __future__ import annotations

from sparsetune.predictors.bank import PredictorBank
from sparsetune.sparsity.recorder import ActivationRecorder
from sparsetune.surgery.structure import decoder_layers


def attach_head_hooks(model, bank: PredictorBank, recorder: ActivationRecorder) -> list:
    """Per layer: the attention input (pre-hook on self_attn) and the per-head output before o_proj
    (pre-hook on o_proj). Active only while the recorder is open. Returns the hook handles."""
    handles = []
    for idx, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn

        def grab_input(module, args, kwargs, idx=idx):
            if recorder.is_open:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                bank.observe_attention_input(idx, hidden)

        def grab_output(module, args, idx=idx):
            if recorder.is_open:
                bank.observe_heads(idx, args[0], recorder.token_mask)

        handles.append(attn.register_forward_pre_hook(grab_input, with_kwargs=True))
        handles.append(attn.o_proj.register_forward_pre_hook(grab_output))
    return handles
