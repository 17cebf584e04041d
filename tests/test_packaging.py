"""The package installs under a distribution name of its own (`sparsetune` on the public index is an unrelated
project), while the import package and the command keep the name sparsetune."""

from importlib import metadata

import sparsetune


def test_the_distribution_is_sparsetune_llm_and_provides_the_sparsetune_command_and_package():
    dist = metadata.distribution("sparsetune-llm")
    assert [ep.value for ep in dist.entry_points if ep.group == "console_scripts" and ep.name == "sparsetune"] == \
        ["sparsetune.cli:main"]
    assert "sparsetune" in (dist.read_text("top_level.txt") or "sparsetune").split()
    assert sparsetune.__name__ == "sparsetune"
    extras = dist.metadata.get_all("Requires-Dist") or []
    assert not any(r.startswith("sparsetune[") or r.startswith("sparsetune ") for r in extras)
