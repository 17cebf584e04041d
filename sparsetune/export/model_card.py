"""The README.md written beside an exported model."""

from __future__ import annotations

from sparsetune.activations import build_activation
from sparsetune.recipe.schema import Recipe


def engines_section(spec: dict, exact: bool, powerinfer: bool) -> list[str]:
    """Which inference engines run this export as it is, so nobody is misled into a silently wrong model. Each
    sentence is tested in sparsetune's suite or says "not run here"."""
    act = build_activation({k: v for k, v in spec.items() if k != "compensation"})
    silu = act.hf_hidden_act == "silu" and exact  # the dense model itself: what every engine runs
    if exact:
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
    ]
    if powerinfer:
        rows.append("| PowerInfer | yes, sparse: `model.powerinfer.gguf` with the predictors, as it is: "
                    "`./build/bin/main -m model.powerinfer.gguf -p TEXT` (CPU, tested; `activation/` holds the neuron "
                    "counts its GPU/CPU split solver reads, GPU mode not run). Measured on SmolLM2-135M from "
                    "`recipes/powerinfer.yaml`: 1.14x its own all-neurons decode, perplexity within 0.1% of "
                    "sparsetune's (docs/ENGINES.md) |")
    elif act.powerinfer_refusal is None:
        rows.append("| PowerInfer | ReLU models with predictors: export with `--powerinfer` (predictors trained "
                    "with `predictor.output_bias: false`, `predictor.input: residual`) |")
    else:
        rows.append(f"| PowerInfer | no: {act.powerinfer_refusal}, not `{spec['activation']}` |")
    return [*rows, ""]


_RULE_READS = {"output_aware": "the output-aware score (sparsetune.json's `score`: `product` reads gate and up, "
                                "`gate` the gate alone)"}


def _conversion_lines(conversion: dict | None, step: int | None) -> list[str]:
    """The conversion to per-layer thresholds (recipe section `thresholds`), when the run made one."""
    if not conversion:
        return []
    (name, value), = conversion["criterion"].items()
    b, a = conversion["before"], conversion["after"]
    reads = _RULE_READS.get(conversion["kind"], "the gate")
    return ["", f"At step {conversion['step']} its `{conversion['from_activation']}` MLPs were converted to per-layer "
            f"`{conversion['kind']}` thresholds on {reads} (fitted to {name.replace('_', ' ')} {value:g}): exact "
            "zeros with no sort. Held-out perplexity "
            f"{b['perplexity']:.3f} -> {a['perplexity']:.3f}, sparsity {b['sparsity']:.1%} -> {a['sparsity']:.1%} "
            "at the conversion" + (f", then {step - conversion['step']} recovery steps." if step and
                                   step > conversion["step"] else " (training-free, after the last step).")]


def model_card(recipe: Recipe, report: dict, activation_note: str, exact: bool, powerinfer: bool = False) -> str:
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
        *_conversion_lines(report.get("thresholds"), report.get("step")),
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
        *engines_section(report.get("activation") or {"activation": recipe.relufy.activation}, exact, powerinfer),
    ]
    return "\n".join(line for line in lines if line is not None)
