import pytest

from sparsetune.errors import SparsetuneError
from sparsetune.recipe.loading import builtin_recipes, load_recipe


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_validates_and_documents_its_command(name):
    recipe = load_recipe(name)
    text = builtin_recipes()[name].read_text()
    assert text.startswith("#"), "header comment"
    assert f"sparsetune train recipes/{name}.yaml" in text
    assert recipe.description


def test_required_recipe_keys_exist():
    r = load_recipe("quickstart", ["train.max_steps=7", "relufy.activation=drelu", "wandb.mode=disabled",
                                   "data.seq_len=64", "train.seed=3", "train.lr=0.001", "regularizer.type=hoyer"])
    assert (r.train.max_steps, r.relufy.activation, r.wandb.mode, r.data.seq_len, r.train.seed, r.train.lr,
            r.regularizer.type) == (7, "drelu", "disabled", 64, 3, 0.001, "hoyer")
    assert r.model.path and r.output_dir and r.data.path


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_step=3"], r"unknown recipe key 'train.max_step'; did you mean 'train.max_steps'\?"),
        (["relufy.activaton=relu"], r"did you mean 'relufy.activation'\?"),
        (["relufy.activation=gelu"], r"'relufy.activation' = 'gelu' is not allowed; expected 'silu', 'relu', "),
        (["train.lr=fast"], r"recipe key 'train.lr': .*valid number.* \(got 'fast'\)"),
        (["train.lr=-1"], r"recipe key 'train.lr': Input should be greater than 0"),
        (["data.seq_len=2"], r"recipe key 'data.seq_len': Input should be greater than or equal to 8"),
        (["wandb.mode=maybe"],
         r"'wandb.mode' = 'maybe' is not allowed; expected 'auto', 'online', 'offline' or 'disabled'"),
        (["regularizer.schedule=prosparse"], r"schedule 'prosparse' needs at least one entry in regularizer.stages"),
        (["train.max_steps"], r"must look like KEY=VALUE"),
        (["train.max_steps=5", "regularizer.schedule=prosparse", "regularizer.stages=[{end_step: 9, coef: 1}]"],
         r"regularizer.stages.0.end_step=9 is beyond train.max_steps=5"),
        (["compensation.enabled=true"], r"ends with relufy.activation=relu, which is not cut from an elementwise"),
        (["relufy.activation=cats", "compensation.enabled=true", "compensation.train=true", "peft.method=lora"],
         r"compensation.train=true trains the bias with the model: full fine-tuning only"),
        (["relufy.activation=output_aware", "compensation.enabled=true", "compensation.train=true"],
         r"compensation.train=true needs the final rule before the last step"),
        (["relufy.activation=output_aware", "relufy.score=both"], r"'relufy.score' = 'both' is not allowed"),
        (["anneal.fraction=1.5"], r"recipe key 'anneal.fraction': Input should be less than or equal to 1"),
    ],
)
def test_bad_recipes_give_one_clear_line(overrides, message):
    with pytest.raises(SparsetuneError, match=message) as info:
        load_recipe("quickstart", overrides)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(SparsetuneError, match=r"recipe file not found: .*nope.yaml"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ntrain: [1,\n")
    with pytest.raises(SparsetuneError, match=r"bad.yaml is not valid YAML \(line"):
        load_recipe(str(bad))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(SparsetuneError, match=r"recipe key 'output_dir' is required"):
        load_recipe(str(empty))


def test_recipe_reference_is_current_and_covers_every_key():
    from pathlib import Path

    from sparsetune.recipe.reference import recipe_reference
    from sparsetune.recipe.schema import Recipe

    doc = Path(__file__).resolve().parents[2] / "docs" / "RECIPES.md"
    assert doc.read_text() == recipe_reference(), "run: python scripts/gen_recipe_docs.py"
    flat = Recipe.model_validate({"output_dir": "x"}).model_dump()
    keys = [f"{s}.{k}" if isinstance(v, dict) else s for s, sec in flat.items()
            for k, v in ((sec.items()) if isinstance(sec, dict) else [(None, sec)])]
    for key in keys:
        assert f"`{key}" in doc.read_text(), key


def test_relufy_keys_live_with_their_activation():
    from sparsetune.recipe.loading import validate_recipe
    from sparsetune.recipe.schema import ACTIVATIONS

    r = validate_recipe({"output_dir": "x", "relufy": {"activation": "fatrelu", "threshold": 0.2}})
    assert r.relufy.threshold == 0.2 and r.model_dump()["relufy"] == {"activation": "fatrelu", "threshold": 0.2,
                                                                      "thresholds": None}
    assert validate_recipe({"output_dir": "x"}).relufy.activation == "relu"  # the default section
    with pytest.raises(SparsetuneError, match=r"'relufy.shift' does not apply to relufy.activation='relu'; it "
                                              r"belongs to relufy.activation='shifted_relu'"):
        validate_recipe({"output_dir": "x", "relufy": {"activation": "relu", "shift": 2.0}})
    # another activation's key is refused at any value, its default included
    with pytest.raises(SparsetuneError, match=r"'relufy.shift' does not apply to relufy.activation='cats'"):
        validate_recipe({"output_dir": "x", "relufy": {"activation": "cats", "shift": 1.0}})
    assert set(ACTIVATIONS) == {"silu", "relu", "shifted_relu", "fatrelu", "drelu", "relu2", "topk", "cats",
                                "output_aware"}


def test_predictor_defaults_give_calibrated_importance_weighted_predictors():
    r = load_recipe("quickstart", ["output_dir=/tmp/x", "predictor.enabled=true"])
    assert r.predictor.target_mass_recall == 0.99 and r.predictor.target_recall is None
    assert r.predictor.label_weighting == "importance"
    r = load_recipe("quickstart", ["output_dir=/tmp/x", "predictor.enabled=true", "predictor.target_recall=0.9"])
    assert r.predictor.target_recall == 0.9 and r.predictor.target_mass_recall is None  # asked for instead
    r = load_recipe("quickstart", ["output_dir=/tmp/x", "predictor.enabled=true", "predictor.target_mass_recall=null"])
    assert r.predictor.target_mass_recall is None  # the global threshold, when asked for
    with pytest.raises(SparsetuneError, match="at most one of predictor.target_recall"):
        load_recipe("quickstart", ["output_dir=/tmp/x", "predictor.target_recall=0.9",
                                   "predictor.target_mass_recall=0.95"])
