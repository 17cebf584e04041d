"""`hf`: a plain Hugging Face folder, which `AutoModelForCausalLM.from_pretrained(DIR)` runs exactly, or a one-line
refusal. What plain transformers can compute is this target's knowledge (transformers' `hidden_act` table, its
MLP's `mlp_bias`), asked of the activation's math:

  - a `hidden_act` whose act(gate) * up is every layer's activation (models/hidden_act.py): relu, silu, relu2, a
    FATReLU whose thresholds are all 0;
  - an activation that is inner(gate - b, up) (`gate_shift`: shifted ReLU) where the family's MLP has gate biases
    (`config.mlp_bias`): b is folded into a gate bias of -b;
  - the dropped-activation compensation as the down projection's bias where the family's MLP builds one from
    `config.mlp_bias` (probed, not listed).
"""

from __future__ import annotations

import torch

from sparsetune.export.targets.base import ExportJob, ExportTarget, HFForm
from sparsetune.models.hidden_act import hidden_act_for


def _width(job: ExportJob) -> int:
    return job.mlps[0].projections()[0].out_features


def _bias_probe(job: ExportJob) -> bool:
    """The family's MLP class builds all three projection biases from `config.mlp_bias` (the config is left as it
    was)."""
    config = job.lm.config
    if config.to_dict().get("mlp_bias") is None:
        return False
    before = config.mlp_bias
    config.mlp_bias = True
    try:
        with torch.device("meta"):
            probe = job.mlps[0].original_class(config)
        return all(getattr(probe, n).bias is not None for n in job.mlps[0].layout_names)
    finally:
        config.mlp_bias = before


def _shift_fold(job: ExportJob) -> tuple[str, list[float]] | None:
    """(hidden_act, per-layer shifts) when every layer is inner(gate - b, up) with one plain `inner` and the family
    has gate biases; else None."""
    shifts = [m.activation.gate_shift() for m in job.mlps]
    if any(s is None for s in shifts) or not job.layout.mlp_bias_config:
        return None
    hidden_act = hidden_act_for([inner for inner, _ in shifts], _width(job))
    return None if hidden_act is None else (hidden_act, [b for _, b in shifts])


def plain_refusal(job: ExportJob) -> str | None:
    """Why plain transformers cannot compute the trained model (one line), or None."""
    acts = [m.activation for m in job.mlps]
    if hidden_act_for(acts, _width(job)) is None and _shift_fold(job) is None:
        return (f"plain transformers has no `hidden_act` computing `{job.spec['activation']}` for model type "
                f"`{job.lm.config.model_type}`")
    if "compensation" in job.spec and not _bias_probe(job):
        return (f"`{job.lm.config.model_type}`'s MLP has no down-projection bias to hold the dropped-activation "
                "compensation")
    return None


def configure_plain_activation(job: ExportJob) -> tuple[bool, dict, str, str | None]:
    """Set config (and weights) so plain transformers computes the trained activation where it can. Returns
    (exact in plain transformers, activation to apply when loading with sparsetune, note, hidden_act)."""
    lm, spec, mlps = job.lm, job.spec, job.mlps
    hidden_act = hidden_act_for([m.activation for m in mlps], _width(job))
    if hidden_act is not None:
        lm.config.hidden_act = hidden_act
        return True, spec, (f"`config.hidden_act = {hidden_act!r}`: plain transformers computes the trained "
                            "activation."), hidden_act
    fold = _shift_fold(job)
    if fold is not None:
        hidden_act, shifts = fold
        lm.config.mlp_bias = True
        for mlp, shift in zip(mlps, shifts):
            for proj in mlp.projections():
                if proj.bias is None:
                    proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype,
                                                               device=proj.weight.device))
            with torch.no_grad():
                mlp.projections()[0].bias.sub_(shift)
        lm.config.hidden_act = hidden_act
        inner = mlps[0].activation.gate_shift()[0]
        b = shifts[0]
        return True, inner.spec(), (
            f"`{spec['activation']}` = {hidden_act}(gate - {b:g}) * up is folded into a gate bias of -{b:g} "
            f"(`mlp_bias: true`, `hidden_act: {hidden_act}`): plain transformers computes it exactly."), hidden_act
    name = spec["activation"]
    closest = mlps[0].activation.undropped or "relu"  # what transformers would run without the zeros
    lm.config.hidden_act = closest
    per_layer = (f" Its {len(spec['thresholds'])} per-layer thresholds are in `sparsetune.json` "
                 "(`load_activation.thresholds`)." if spec.get("thresholds") else "")
    return False, spec, (
        f"**Plain transformers cannot express `{name}`** for model type `{lm.config.model_type}` (no `hidden_act` "
        f"computes it; `{closest}` would run the model without its zeros). Load it with "
        f"`sparsetune.load_sparse_model(path)` (or `sparsetune eval path`), or with transformers' remote code as below."
        f"{per_layer}"), None


def fold_compensation(job: ExportJob, load_spec: dict) -> tuple[bool, dict, str]:
    """Put the compensation biases (when the model has them) where plain transformers computes them: the down
    projection's bias of an MLP class that has one (`config.mlp_bias`: llama and kin; gate / up get zero biases),
    else they stay in sparsetune.json's load_activation. Returns (exact in plain transformers, load spec, note)."""
    lm, mlps = job.lm, job.mlps
    if "compensation" not in load_spec:
        return True, load_spec, ""
    if not _bias_probe(job):
        return False, load_spec, (f"The dropped-activation compensation biases are in `sparsetune.json` "
                                  f"(`load_activation.compensation`): `{lm.config.model_type}`'s MLP has no "
                                  "down-projection bias to hold them.")
    lm.config.mlp_bias = True
    for m in mlps:
        for name, proj in zip(m.layout_names, m.projections()):
            value = m.compensation if name == m.layout_names[2] else torch.zeros(proj.out_features)
            proj.bias = torch.nn.Parameter(value.detach().to(proj.weight.dtype).clone())
        m.compensation = None
    rest = {k: v for k, v in load_spec.items() if k != "compensation"}
    return True, rest, ("The dropped-activation compensation is the down projection's bias (`config.mlp_bias = "
                        "true`; gate and up biases are zero), added after the trained activation's zeros.")


def express_plain(job: ExportJob) -> HFForm:
    """The plain folder's form, as exact as plain transformers allows (the model's config and weights changed)."""
    exact, load_spec, note, hidden_act = configure_plain_activation(job)
    compensated = "compensation" in load_spec
    folded, load_spec, comp_note = fold_compensation(job, load_spec)
    return HFForm(exact=exact and folded, load_spec=load_spec, note=f"{note} {comp_note}".strip(),
                  in_bias=compensated and "compensation" not in load_spec, hidden_act=hidden_act)


class HuggingFace(ExportTarget):
    name = "hf"
    help = "a plain Hugging Face folder (refused when plain transformers cannot compute the trained model)"

    def refusal(self, job: ExportJob) -> str | None:
        why = plain_refusal(job)
        return None if why is None else f"--target hf: {why}; export with --target hf_code"

    def express(self, job: ExportJob) -> HFForm:
        return express_plain(job)


TARGET = HuggingFace
