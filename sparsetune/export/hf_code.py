"""The Hugging Face "with code" export target: a folder whose trained activation (or compensation) plain transformers
cannot express gets its own `model_type` (`sparsetune_<base>`), `architectures` and `auto_map`, and the small
self-contained modeling file templates/modeling_sparsetune.py. Then

  AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   computes what sparsetune measured
  AutoModelForCausalLM.from_pretrained(DIR)                           refuses (custom code), never runs SiLU
  vLLM / SGLang / llama.cpp's converter                                see an architecture they do not know

and sparsetune's own loader reads it without running the folder's code (sources/code_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsetune.sources.code_export import PREFIX

CODE_FILE = "modeling_sparsetune.py"
_TEMPLATE = Path(__file__).parent / "templates" / CODE_FILE
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
