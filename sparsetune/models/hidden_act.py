"""What plain transformers computes for a config's `hidden_act` (its ACT2FN table), matched to sparsetune's
activations by their math (`MLPActivation.computes`), never by a list of names: loading a plain model folder asks
which activation its `hidden_act` is, the plain Hugging Face export target which `hidden_act` an activation is."""

from __future__ import annotations

from sparsetune.activations import MLPActivation, activation_class, activation_names, build_activation


def _act2fn(name: str | None):
    from transformers.activations import ACT2FN

    if name is None or name not in ACT2FN:
        return None
    try:
        return ACT2FN[name]
    except Exception:  # noqa: BLE001 - an entry that cannot be built without arguments computes nothing here
        return None


def transformers_computes(activation: MLPActivation, hidden_act: str | None, width: int = 64) -> bool:
    """Plain transformers' MLP with `hidden_act` computes `activation` exactly (act(gate) * up)."""
    fn = _act2fn(hidden_act)
    return fn is not None and activation.computes(lambda gate, up: fn(gate) * up, width)


def hidden_act_for(activations: list[MLPActivation], width: int = 64) -> str | None:
    """The `hidden_act` with which plain transformers computes every layer's activation exactly (tried: the
    activation's own name, then the elementwise function its zeros are cut from), or None."""
    first = activations[0]
    for name in dict.fromkeys((first.name, first.undropped)):
        if all(transformers_computes(a, name, width) for a in activations):
            return name
    return None


def _stateless(name: str) -> MLPActivation | None:
    """The activation `name` at its recipe defaults, when it needs no data (a calibrated one computes no fixed
    function before it is fitted)."""
    if activation_class(name).needs_data:
        return None
    return build_activation({"activation": name})


def activation_for_hidden_act(hidden_act: str | None) -> str | None:
    """The sparsetune activation a plain model folder's `hidden_act` computes (its own name first: relu, silu,
    relu2; then any whose math it is: swish is silu), or None."""
    if _act2fn(hidden_act) is None:
        return None
    names = activation_names()
    for name in ([hidden_act] if hidden_act in names else []) + names:
        act = _stateless(name)
        if act is not None and transformers_computes(act, hidden_act):
            return name
    return None


def known_hidden_acts() -> list[str]:
    """The `hidden_act` names some sparsetune activation computes (for an error message)."""
    from transformers.activations import ACT2FN

    return [h for h in ACT2FN if activation_for_hidden_act(h) is not None]
