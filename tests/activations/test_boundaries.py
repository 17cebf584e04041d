"""The rooms of an activation: `sparsetune/activations/*.py` import nothing of export, dynamic, evaluation or
training (nor anything else above the recipe's section base), and those packages special-case no activation by name
(a string comparison with an activation's name, an isinstance check against a plugin's class): they ask the
activation through its protocol (activations/base.py)."""

from __future__ import annotations

import re
from pathlib import Path

import sparsetune
from sparsetune.activations import activation_modules

PACKAGE = Path(sparsetune.__file__).parent
ALLOWED = ("sparsetune.activations", "sparsetune.errors", "sparsetune.recipe.section")
IMPORT = re.compile(r"^\s*(?:from\s+(sparsetune[\w.]*)\s+import|import\s+(sparsetune[\w.]*))", re.M)


def test_activations_import_nothing_above_them():
    found = {}
    for path in sorted((PACKAGE / "activations").glob("*.py")):
        for match in IMPORT.finditer(path.read_text()):
            module = match.group(1) or match.group(2)
            if not module.startswith(ALLOWED):
                found.setdefault(path.name, []).append(module)
    assert found == {}
    banned = ("export", "dynamic", "evaluation", "training")
    for path in (PACKAGE / "activations").glob("*.py"):
        text = path.read_text()
        assert not any(f"sparsetune.{b}" in text for b in banned), path.name


def _special_cases(text: str) -> list[str]:
    names = "|".join(re.escape(n) for n in activation_modules())
    classes = "|".join(re.escape(m.ACTIVATION.__name__) for m in activation_modules().values())
    patterns = [
        rf"""(==|!=)\s*["']({names})["']""",  # x == "output_aware"
        rf"""["']({names})["']\s*(==|!=)""",  # "output_aware" == x
        rf"""\b(not\s+)?in\s*[(\[{{][^)\]}}]*["']({names})["'][^)\]}}]*[)\]}}]""",  # x in ("cats", "fatrelu")
        rf"""isinstance\([^)]*\b({classes})\b""",  # isinstance(act, OutputAware)
        rf"""from\s+sparsetune\.activations\.({names})\s+import\s+[^\n]*\b({classes})\b""",  # a plugin's class
    ]
    return [m.group(0) for p in patterns for m in re.finditer(p, text)]


# Matches that are no activation special case, each with why.
NOT_ACTIVATIONS = {
    "export/powerinfer.py": ['not in ("relu", "none")'],  # predictor.nonlinearity, the predictors' own function
    # the dense teacher computes the original SwiGLU model, whatever the run's activation
    "training/components/distillation.py": ["from sparsetune.activations.silu import SiLU"],
}


def test_later_rooms_special_case_no_activation_by_name():
    found = {}
    for package in ("export", "dynamic", "evaluation", "training"):
        for path in sorted((PACKAGE / package).rglob("*.py")):
            if "templates" in path.parts:  # the with-code target's modeling file: its table is what it computes
                continue
            key = str(path.relative_to(PACKAGE))
            hits = [h for h in _special_cases(path.read_text()) if h not in NOT_ACTIVATIONS.get(key, [])]
            if hits:
                found[key] = hits
    assert found == {}


def test_the_grep_finds_what_it_looks_for():
    """The patterns above catch the forms they name (so an empty result means something)."""
    assert _special_cases('if kind == "output_aware":') and _special_cases("isinstance(first, OutputAware)")
    assert _special_cases('x in ("cats", "fatrelu")') and _special_cases("from sparsetune.activations.cats import CATS")
    assert not _special_cases('name = "output_awareness"') and not _special_cases("kind == form")
