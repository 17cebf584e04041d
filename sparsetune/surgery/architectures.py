"""Where the SwiGLU MLP lives in each supported model family (data, not branches).

Adding a family = one entry here + a tiny-config test in tests/surgery/.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MLPLayout:
    """How to find one family's SwiGLU MLPs: layers container, MLP attribute and projection names."""

    layers: str  # dotted path from the CausalLM to the list of decoder layers
    mlp: str  # attribute of a decoder layer holding the MLP
    gate: str
    up: str
    down: str
    act: str  # attribute of the MLP holding the activation (SiLU in the original)
    mlp_bias_config: bool  # config has `mlp_bias`, so a gate bias can be exported to plain transformers


_SWIGLU = dict(layers="model.layers", mlp="mlp", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")

ARCHITECTURES: dict[str, MLPLayout] = {
    "llama": MLPLayout(**_SWIGLU, mlp_bias_config=True),
    "mistral": MLPLayout(**_SWIGLU, mlp_bias_config=False),
    "qwen2": MLPLayout(**_SWIGLU, mlp_bias_config=False),
    "qwen3": MLPLayout(**_SWIGLU, mlp_bias_config=False),
}


def layout_for(model_type: str) -> MLPLayout:
    from sparsetune.errors import SparsetuneError

    if model_type not in ARCHITECTURES:
        raise SparsetuneError(
            f"model type {model_type!r} has no SwiGLU MLP that sparsetune knows how to sparsify "
            f"(supported model types: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]
