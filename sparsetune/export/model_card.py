"""The README.md written beside an exported model."""

from __future__ import annotations

from sparsetune.activations import build_activation
from sparsetune.export.targets.base import HFForm
from sparsetune.recipe.schema import Recipe

# The one `hidden_act` vLLM's / SGLang's and llama.cpp's Llama MLP computes (the SwiGLU model itself).
DENSE_HIDDEN_ACT = "silu"


def engines_section(form: HFForm, target_rows: list[str]) -> list[str]:
    """Which inference engines run this export as it is, so nobody is misled into a silently wrong model. Each
    sentence is tested in sparsetune's suite or says "not run here". `target_rows`: the export targets' own rows
    (export/targets: `card_rows`)."""
    silu = form.exact and form.hidden_act == DENSE_HIDDEN_ACT  # the dense model itself: what every engine runs
    if form.exact:
        hf = "yes, exactly: `AutoModelForCausalLM.from_pretrained(PATH)` (tested: equal logits)"
        vllm = ("yes" if silu else "not natively: their Llama MLP refuses any `hidden_act` but `silu` (read in "
                "their source, not run here)")
        cpp = ("yes" if silu else "**no**: its llama architecture applies SiLU in the MLP whatever `hidden_act` says "
               "(read in PowerInfer's llama.cpp fork; upstream not run here), so a converted file runs silently "
               "wrong; do not convert it")
    else:
        hf = ("yes, exactly, with the folder's code: `AutoModelForCausalLM.from_pretrained(PATH, "
              "trust_remote_code=True)` (tested: equal logits); without `trust_remote_code` it refuses to load the "
              "folder (tested) instead of running the dense model")
        vllm = ("not natively: `architectures` names `SparsetuneForCausalLM`, which they do not implement (not run "
                "here); a Transformers backend with `trust_remote_code` would run the folder's code (not run here)")
        cpp = ("no: its converter does not know the architecture `SparsetuneForCausalLM` (not run here); it never "
               "sees a plain SiLU Llama")
    rows = [
        "## Inference engines",
        "What was run is in sparsetune's docs/ENGINES.md (commands, figures).",
        "",
        "| engine | runs this export? |",
        "| --- | --- |",
        f"| transformers | {hf} |",
        f"| vLLM, SGLang | {vllm} |",
        f"| llama.cpp | {cpp} |",
        *target_rows,
    ]
    return [*rows, ""]


_READS = {"gate": "the gate", "product": "gate and up (the score reads both)", "none": "the activation"}


def _conversion_lines(conversion: dict | None, step: int | None, reads_of: str | None = None) -> list[str]:
    """The conversion to per-layer thresholds (recipe section `thresholds`), when the run made one."""
    if not conversion:
        return []
    (name, value), = conversion["criterion"].items()
    b, a = conversion["before"], conversion["after"]
    reads = _READS[reads_of] if reads_of else "the gate"
    return ["", f"At step {conversion['step']} its `{conversion['from_activation']}` MLPs were converted to per-layer "
            f"`{conversion['kind']}` thresholds on {reads} (fitted to {name.replace('_', ' ')} {value:g}): exact "
            "zeros with no sort. Held-out perplexity "
            f"{b['perplexity']:.3f} -> {a['perplexity']:.3f}, sparsity {b['sparsity']:.1%} -> {a['sparsity']:.1%} "
            "at the conversion" + (f", then {step - conversion['step']} recovery steps." if step and
                                   step > conversion["step"] else " (training-free, after the last step).")]


def model_card(recipe: Recipe, report: dict, form: HFForm, target_rows: list[str]) -> str:
    """The README.md of an export: what was trained, the activation (`form.note`), the measurements, how to load
    it, and the engines that run it."""
    activation_note, exact = form.note, form.exact
    spec = {k: v for k, v in (report.get("activation") or {}).items() if k != "compensation"}
    reads_of = build_activation(spec).rule_reads if spec else None
    ev = report.get("evaluation", {})
    sparsity = ev.get("sparsity")
    ppl = ev.get("perplexity")
    per_layer = ev.get("per_layer") or []
    lines = [
        "---",
        "library_name: transformers",
        "tags: [sparsetune, activation-sparsity, relu]",
        "---",
        f"# Sparsified {recipe.model.path}",
        "",
        f"Fine-tuned with sparsetune for activation sparsity: activation "
        f"`{recipe.relufy.activation}`, regularizer `{recipe.regularizer.type}` "
        f"({recipe.regularizer.schedule} schedule), {report.get('step')} steps, {report.get('tokens_seen')} tokens"
        f"{', LoRA merged' if recipe.peft.method == 'lora' else ''}.",
        *_conversion_lines(report.get("thresholds"), report.get("step"), reads_of),
        "",
        "## Activation",
        activation_note,
        "",
        "## Measured (held-out)",
        "| metric | value |",
        "| --- | --- |",
        f"| perplexity | {ppl:.3f} |" if ppl is not None else "| perplexity | not measured |",
        f"| mean MLP activation sparsity (exact zeros) | {sparsity:.1%} |" if sparsity is not None else "",
    ]
    if ev.get("near_zero") is not None:
        lines.append(f"| near-zero activations (abs <= {ev['near_zero_threshold']:g}) | {ev['near_zero']:.1%} |")
    if per_layer:
        lines += ["", "Per-layer sparsity: " + ", ".join(f"{v:.0%}" for v in per_layer)]
    lines += [
        "",
        "## Load",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH)" if exact else
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # runs modeling_sparsetune.py",
        "# or: import sparsetune; model = sparsetune.load_sparse_model(PATH)",
        "```",
        "",
        "`sparsity_report.json` holds the per-layer numbers and the full recipe; `recipe.yaml` re-runs the training.",
        "",
        *engines_section(form, target_rows),
    ]
    return "\n".join(line for line in lines if line is not None)
