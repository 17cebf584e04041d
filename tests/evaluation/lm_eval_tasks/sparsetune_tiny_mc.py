"""Data of the sparsetune_tiny_mc task: the JSON lines file beside this module, found from any working directory."""

from pathlib import Path

import datasets

DATA = Path(__file__).with_name("sparsetune_tiny_mc.jsonl")


def load(**_metadata) -> datasets.DatasetDict:
    """The `custom_dataset` of sparsetune_tiny_mc.yaml; the harness passes the task's metadata, not needed here."""
    return datasets.load_dataset("json", data_files={"test": str(DATA)})
