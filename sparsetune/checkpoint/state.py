"""What goes into a checkpoint folder, and how each piece is read back safely.

  model/                 full fine-tune: HF folder (config + safetensors); LoRA: the peft adapter folder
  tokenizer/             the tokenizer, so exports need nothing but the checkpoint (and, for LoRA, the base)
  optimizer.pt           optimizer state (tensors only; loaded with weights_only=True; absent when the model is frozen)
  scheduler.pt           LR scheduler state (loaded with weights_only=True)
  predictors/            co-trained predictors (predictors.safetensors + predictors.json), when enabled
  predictor_optimizer.pt their optimizer state
  trainer_state.json     TrainingProgress: step, tokens, data position, W&B run id, last evaluation, non-finite steps
  data_fingerprint.json  the training and held-out rows' count and sha256 (a resume on other rows is refused)
  anneal.json            the annealing's segment (its end is kept when train.max_steps grows), when annealing
  rng_state_rank{r}.json python / numpy / torch RNG states of each rank, as JSON
  recipe.yaml            the resolved recipe
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from sparsetune.recipe.loading import read_yaml, validate_recipe
from sparsetune.recipe.schema import Recipe


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def read_recipe(folder: Path) -> Recipe:
    return validate_recipe(read_yaml(folder / "recipe.yaml"), source=str(folder / "recipe.yaml"))


def read_rng_state(folder: Path, rank: int) -> dict | None:
    """This rank's RNG states, or None when the checkpoint was written by fewer processes."""
    path = folder / f"rng_state_rank{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def load_torch_state(path: Path):
    """Optimizer / scheduler state: plain tensors and containers only, no code runs."""
    return torch.load(path, map_location="cpu", weights_only=True)


def is_lora_checkpoint(folder: Path) -> bool:
    return (folder / "model" / "adapter_config.json").is_file()
