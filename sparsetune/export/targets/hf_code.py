"""`hf_code`: the Hugging Face "with code" export target: a folder whose trained activation (or compensation)
plain transformers cannot express gets its own `model_type` (`sparsetune_<base>`), `architectures` and `auto_map`,
and the small self-contained modeling file templates/modeling_sparsetune.py. Then

  AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   computes what sparsetune measured
  AutoModelForCausalLM.from_pretrained(DIR)                           refuses (custom code), never runs SiLU
  vLLM / SGLang / llama.cpp's converter                                see an architecture they do not know

and sparsetune's own loader reads it without running the folder's code (sources/code_export.py).
"""

from __future__ import annotations

import ast
import json
from functools import cache
from pathlib import Path

from sparsetune.export.targets.base import ExportJob, ExportTarget, HFForm
from sparsetune.export.targets.hf import express_plain
from sparsetune.sources.code_export import PREFIX

CODE_FILE = "modeling_sparsetune.py"
_TEMPLATE = Path(__file__).parent.parent / "templates" / CODE_FILE
ARCHITECTURE = "SparsetuneForCausalLM"


def write_code_target(folder: Path, load_spec: dict, layout) -> None:
    """Turn the plain HF folder just saved in `folder` into one that loads only with its own code, computing
    `load_spec` (a `relufy` section with every layer's values, compensation included) in every MLP."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    base = config["model_type"]
    config.update({
        "model_type": PREFIX + base,
        "architectures": [ARCHITECTURE],
        "auto_map": {"AutoConfig": f"{CODE_FILE[:-3]}.SparsetuneConfig",
                     "AutoModelForCausalLM": f"{CODE_FILE[:-3]}.{ARCHITECTURE}"},
        "sparsetune_base_model_type": base,
        "sparsetune_activation": load_spec,
        "sparsetune_mlp": {"layers": layout.layers, "mlp": layout.mlp, "gate": layout.gate, "up": layout.up,
                           "down": layout.down},
    })
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    code = _TEMPLATE.read_text().replace('BASE_MODEL_TYPE = "llama"', f"BASE_MODEL_TYPE = {base!r}", 1)
    (folder / CODE_FILE).write_text(code)


@cache
def template_activations() -> tuple[str, ...]:
    """The activations the modeling code computes (the keys of its ACTIVATIONS table, read without importing it)."""
    for node in ast.parse(_TEMPLATE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ACTIVATIONS" for t in node.targets):
            return tuple(k.value for k in node.value.keys)
    return ()


def code_refusal(job: ExportJob) -> str | None:
    """Why the modeling code cannot compute the trained model, or None."""
    name = job.spec["activation"]
    if name not in template_activations():
        return (f"the folder's modeling code ({CODE_FILE}) has no activation `{name}` (it computes "
                f"{', '.join(template_activations())})")
    return None


def with_code(job: ExportJob, form: HFForm) -> HFForm:
    """`form` as a folder with its own model_type and modeling code."""
    form.note = (f"{form.note} The folder therefore has its own `model_type` (`sparsetune_{job.lm.config.model_type}`) "
                 f"and modeling code (`{CODE_FILE}`): `AutoModelForCausalLM.from_pretrained(PATH, "
                 "trust_remote_code=True)` computes the trained model exactly (per-layer values in config.json's "
                 "`sparsetune_activation`); without `trust_remote_code` transformers refuses to load it instead of "
                 "running the dense model.")
    form.exact, form.code = False, True
    return form


def express_auto(job: ExportJob) -> HFForm:
    """The plain folder where plain transformers computes the model exactly, else the folder with code."""
    form = express_plain(job)
    return form if form.exact else with_code(job, form)


class HuggingFaceCode(ExportTarget):
    name = "hf_code"
    help = ("a Hugging Face folder with its own modeling code: trust_remote_code=True computes the trained model "
            "exactly, plain loading refuses")
    files = (CODE_FILE,)

    def refusal(self, job: ExportJob) -> str | None:
        why = code_refusal(job)
        return None if why is None else f"--target hf_code: {why}"

    def express(self, job: ExportJob) -> HFForm:
        return with_code(job, express_plain(job))

    def write(self, job: ExportJob, folder: Path, form: HFForm) -> None:
        write_code_target(folder, form.load_spec, job.layout)


TARGET = HuggingFaceCode
