"""The one builder of the model's life: any source -> a model with SparseMLPs, its stored per-layer activation state
and (merged) LoRA adapters. `train`, `export`, `eval` and `analyze` all build their model here.

  source                           what is loaded                          activation
  a run folder / checkpoint        the checkpoint's weights (LoRA: the      the checkpoint's recipe, then its
                                   base it names, then the adapter)         activation state (checkpoint part)
  an export (sparsetune.json)      the folder's weights                     sparsetune.json's load_activation
  an HF folder, .gguf, alias, hub  the model (sources/loading.py)           what its config's hidden_act computes

A new run calls the steps itself, with its components between them: `SparseModel.load` (the dense model),
`surgery` (activation, stored state, calibration on data), `with_peft` (LoRA).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sparsetune.checkpoint.activation_state import load_activation_state
from sparsetune.checkpoint.folders import RUN_MARKER
from sparsetune.checkpoint.state import is_lora_checkpoint, read_recipe, read_trainer_state
from sparsetune.checkpoint.store import MARKER, resolve_checkpoint
from sparsetune.console import notice
from sparsetune.errors import SparsetuneError
from sparsetune.models.hidden_act import activation_for_hidden_act, known_hidden_acts
from sparsetune.models.lora import with_peft
from sparsetune.recipe.schema import DataSection, Recipe, RelufyConfig
from sparsetune.sources.code_export import base_config
from sparsetune.sources.loading import load_model, load_model_and_tokenizer, load_tokenizer
from sparsetune.surgery.calibration import calibrate, calibration_batches, needs_calibration
from sparsetune.surgery.relufy import relufy
from sparsetune.surgery.sparse_mlp import SparseMLP

SPEC_FILE = "sparsetune.json"  # an export's marker: its activation, what it was exported from, its files
_REEXPORT = "it is written by `sparsetune export`: export the run again"


def read_load_activation(spec_file: Path) -> dict:
    """The `load_activation` section of an export's sparsetune.json, checked before any weight is read: valid JSON,
    the key present, every value of the relufy section allowed, compensation biases lists of finite numbers. A
    damaged or edited file is a one-line SparsetuneError naming the file and the key; whether the per-layer values
    fit the model (one per layer, as wide as the MLP) is checked by `relufy` on the model."""
    from pydantic import ValidationError

    from sparsetune.recipe.schema import relufy_config
    from sparsetune.surgery.relufy import describe_spec_error

    try:
        spec = json.loads(spec_file.read_bytes())
    except OSError as exc:
        raise SparsetuneError(f"{spec_file} could not be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise SparsetuneError(f"{spec_file} is not valid JSON ({exc}); {_REEXPORT}") from None
    if not isinstance(spec, dict):
        raise SparsetuneError(f"{spec_file} must hold a JSON object, got {json.dumps(spec)[:40]}; {_REEXPORT}")
    if "load_activation" not in spec:
        raise SparsetuneError(f"{spec_file} has no key 'load_activation' (the activation the model computes); "
                              f"{_REEXPORT}")
    section = spec["load_activation"]
    if not isinstance(section, dict):
        raise SparsetuneError(f"{spec_file}: key 'load_activation' must be a JSON object (a relufy section), got "
                              f"{json.dumps(section)[:40]}; {_REEXPORT}")
    if "activation" not in section:  # the recipe's default (relu) would be a silent guess here
        raise SparsetuneError(f"{spec_file} has no key 'load_activation.activation'; {_REEXPORT}")
    section = dict(section)
    compensation = section.pop("compensation", None)
    try:
        relufy_config(section, strict=True)
    except ValidationError as exc:
        raise SparsetuneError(f"{describe_spec_error(exc, str(spec_file), 'load_activation')}; {_REEXPORT}") from None
    if compensation is not None:
        if not isinstance(compensation, list) or not all(isinstance(b, list) for b in compensation):
            raise SparsetuneError(f"{spec_file}: key 'load_activation.compensation' must be a list of per-layer bias "
                                  f"lists, got {json.dumps(compensation)[:40]}; {_REEXPORT}")
        for i, bias in enumerate(compensation):
            bad = next((j for j, v in enumerate(bias) if isinstance(v, bool) or not isinstance(v, (int, float))
                        or not math.isfinite(v)), None)
            if bad is not None:
                raise SparsetuneError(f"{spec_file}: key 'load_activation.compensation[{i}][{bad}]' = "
                                      f"{bias[bad]!r} is not a finite number; {_REEXPORT}")
    return spec["load_activation"]


def activation_for_hf_config(config) -> dict:
    """The activation a plain model computes, from its config's `hidden_act`."""
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    name = activation_for_hidden_act(act)
    if name is None:
        raise SparsetuneError(f"model config hidden_act={act!r} has no sparsetune equivalent (known: "
                              f"{', '.join(known_hidden_acts())})")
    return {"activation": name}


def is_run_or_checkpoint(path: Path) -> bool:
    """`path` is a run folder or one checkpoint (what `SparseModel.from_source` reads as a checkpoint)."""
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / MARKER).is_file()
                              or (path / RUN_MARKER).is_file())


@dataclass
class SparseModel:
    """A model with SparseMLPs and what came with it. `data`: the held-out data it belongs with (its run's or
    export's recipe, else the default); `predictors`: the folder of its co-trained predictors, if any."""

    model: object
    tokenizer: object
    what: str  # "checkpoint at step N", "export", "model"
    data: DataSection = field(default_factory=DataSection)
    recipe: Recipe | None = None  # a run's / checkpoint's recipe
    checkpoint: Path | None = None
    trainer_state: dict = field(default_factory=dict)
    predictors: Path | None = None

    # ------------------------------------------------------------ any source
    @classmethod
    def from_source(cls, source: str | Path, *, trust_remote_code: bool = False, activation: dict | None = None,
                    merge_lora: bool = True) -> SparseModel:
        """The model of `source` (a run, checkpoint, export, HF folder, .gguf file, alias or hub id), surgery'd with
        its own activation and state, LoRA merged unless `merge_lora` is False; `activation` (a relufy section as a
        dict) swaps the activation afterwards. Remote code runs only when the caller passes `trust_remote_code`
        (the command line), never because a checkpoint's or export's own recipe asks for it."""
        path = Path(source)
        if is_run_or_checkpoint(path):
            built = cls._from_checkpoint(resolve_checkpoint(path), trust_remote_code, merge_lora)
        elif path.is_dir() and (path / "config.json").is_file():
            built = cls._from_folder(path, trust_remote_code)
        else:
            model, tokenizer = load_model_and_tokenizer(str(source), trust_remote_code=trust_remote_code)
            relufy(model, activation_for_hf_config(model.config))
            built = cls(model, tokenizer, "model")
        if activation is not None:
            relufy(built.model, activation)
        return built

    @classmethod
    def _from_checkpoint(cls, folder: Path, trust_remote_code: bool, merge_lora: bool) -> SparseModel:
        recipe = read_recipe(folder)
        if recipe.model.trust_remote_code and not trust_remote_code:
            notice(f"{folder}/recipe.yaml sets model.trust_remote_code=true; ignored (pass --trust-remote-code to "
                    "allow the model's own code to run)")
        if is_lora_checkpoint(folder):
            from peft import PeftModel

            from sparsetune.checkpoint.base_model import check_base_unchanged

            check_base_unchanged(folder, recipe.model.path)  # the adapter is merged into the weights it trained on
            built = cls.load(recipe.model.path, recipe.model.dtype, recipe.model.revision, trust_remote_code)
            built.surgery(recipe.relufy, state_from=folder)
            built.model = PeftModel.from_pretrained(built.model, str(folder / "model"))
            if merge_lora:
                built.model = built.model.merge_and_unload()
        else:
            model = load_model(str(folder / "model"), recipe.model.dtype, trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(str(folder / "tokenizer"), trust_remote_code=trust_remote_code)
            built = cls(model, tokenizer, "")
            built.surgery(recipe.relufy, state_from=folder)
        built.recipe, built.data, built.checkpoint = recipe, recipe.data, folder
        built.trainer_state = read_trainer_state(folder)
        built.what = f"checkpoint at step {built.trainer_state.get('step')}"
        if (folder / "predictors" / "predictors.json").is_file():
            built.predictors = folder / "predictors"
        return built

    @classmethod
    def _from_folder(cls, path: Path, trust_remote_code: bool) -> SparseModel:
        """An export (its activation in sparsetune.json, its data in recipe.yaml) or a plain HF folder."""
        spec_file = path / SPEC_FILE
        load_activation = read_load_activation(spec_file) if spec_file.is_file() else None  # before the weights
        # a "with code" export is read as its base architecture; sparsetune runs none of the folder's code
        model = load_model(str(path), trust_remote_code=trust_remote_code, config=base_config(path))
        tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        if load_activation is not None:
            try:  # per-layer values that do not fit this model (counts, widths)
                relufy(model, load_activation, source=str(spec_file), section="load_activation")
            except SparsetuneError as exc:
                raise SparsetuneError(f"{exc}; {_REEXPORT}") from None
        else:
            relufy(model, activation_for_hf_config(model.config))
        built = cls(model, tokenizer, "model", predictors=path if (path / "predictors.json").is_file() else None)
        if (path / "recipe.yaml").is_file():  # an export: evaluated on the held-out data it was trained against
            from sparsetune.recipe.loading import read_yaml, validate_recipe

            built.data = validate_recipe(read_yaml(path / "recipe.yaml"), str(path / "recipe.yaml")).data
            built.what = "export"
        return built

    # --------------------------------------------------------- a new run's steps
    @classmethod
    def load(cls, path: str, dtype: str = "float32", revision: str | None = None,
             trust_remote_code: bool = False) -> SparseModel:
        """The dense model a run starts from (`model.path`), before surgery."""
        model, tokenizer = load_model_and_tokenizer(path, dtype, revision, trust_remote_code)
        return cls(model, tokenizer, "model")

    def surgery(self, cfg: RelufyConfig | dict, state_from: Path | None = None,
                calibration: Callable[[int], Iterable[dict]] | None = None, device=None, seed: int = 0,
                progress: bool = True) -> list[SparseMLP]:
        """SparseMLPs with the `relufy` activation, then the per-layer state a checkpoint `state_from` computed (never
        recomputed); what is still to be fitted (CATS thresholds) is calibrated on `calibration(n)`, the first n
        training micro-batches."""
        mlps = relufy(self.model, cfg)
        if state_from is not None:
            load_activation_state(self.model, state_from)
        if needs_calibration(self.model):
            if calibration is None:
                raise SparsetuneError(f"relufy.activation={mlps[0].activation.name} is fitted on training data "
                                      "first; this model has no fitted state and no data was given")
            n = calibration_batches(self.model)
            if device is not None:
                self.model.to(device)
            calibrate(self.model, calibration(n), device, total=n, seed=seed, progress=progress, report=notice)
        return mlps

    def with_peft(self, peft) -> object:
        """The model with LoRA adapters when the recipe's `peft` section asks for them."""
        self.model = with_peft(self.model, peft)
        return self.model


def load_sparse_model(folder: str | Path, dtype: str = "float32"):
    """A transformers model from an export folder (or a run, checkpoint, or any HF model) with sparsetune's
    SparseMLPs (exact activation, activation capture) in place. Works for drelu / topk / fatrelu exports that plain
    transformers cannot express."""
    import torch

    from sparsetune.sources.loading import DTYPES

    model = SparseModel.from_source(folder).model
    return model.to(DTYPES[dtype]) if DTYPES[dtype] != torch.float32 else model
