#!/usr/bin/env python
"""Regenerate docs/RECIPES.md (every recipe key, its type, default and meaning) from the schema."""

from pathlib import Path

from sparsetune.recipe.reference import recipe_reference

out = Path(__file__).resolve().parents[1] / "docs" / "RECIPES.md"
out.write_text(recipe_reference())
print(f"wrote {out}")
