"""`sparsetune eval --tasks`: lm-evaluation-harness scores the model sparsetune loaded, offline, on a local task."""

import json
import sys
from pathlib import Path

import pytest

from sparsetune.cli import main
from tests.e2e_helpers import one_error

TASKS = Path(__file__).parent / "lm_eval_tasks"  # sparsetune_tiny_mc: 20 made-up questions, 2 to 4 choices
TASK = "sparsetune_tiny_mc"


@pytest.fixture(scope="module", autouse=True)
def harness_index_built_once():
    """lm-eval's TaskManager reads every YAML of the harness's own task folder (thousands) each time it is made,
    about 10 s here; the folders do not change during the tests, so the index of a set of folders is read once per
    module and each TaskManager gets its own copy of it. The tests still go through sparsetune's load_tasks and
    the harness's TaskManager, matching and loading as before."""
    try:
        from lm_eval.tasks._index import TaskIndex
    except ImportError:  # test_bad_input_is_one_line checks the message without lm-eval; the rest need it
        yield
        return
    build, built = TaskIndex.build, {}

    def build_once(paths, **kwargs):
        paths = list(paths)
        key = (tuple(str(p) for p in paths), tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build(paths, **kwargs)
        return dict(built[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskIndex, "build", staticmethod(build_once))
        yield


def test_local_task_through_the_cli(tiny_model_dirs, tmp_path, monkeypatch, capsys):
    # Another working directory: the task finds its data beside its YAML, not relative to where eval runs.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    # drelu cannot be written into a plain transformers config: the harness must get the patched model object.
    assert main(["eval", str(tiny_model_dirs["llama"]), "--activation", "drelu", "--batches", "1", "--batch-size", "2",
                 "--tasks", TASK, "--include-path", str(TASKS), "--limit", "12", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{TASK} acc (0-shot, 12 of 20 examples)" in printed and f"{TASK} acc_norm" in printed
    result = json.loads(out.read_text())
    assert result["activation"]["activation"] == "drelu" and result["perplexity"] > 1
    down = result["downstream"]
    assert down["harness"].startswith("lm-eval ") and down["limit"] == 12 and down["include_path"] == str(TASKS)
    scores = down["tasks"][TASK]
    assert scores["examples"] == 12 and scores["task_examples"] == 20 and scores["num_fewshot"] == 0
    for metric in ("acc", "acc_norm"):
        assert 0 <= scores[metric] <= 1
        # 12 examples scored 0 or 1 each: a multiple of 1/12, with the harness's standard error of a mean
        assert scores[metric] * 12 == pytest.approx(round(scores[metric] * 12))
        p = scores[metric]
        assert scores[f"{metric}_stderr"] == pytest.approx((p * (1 - p) / 11) ** 0.5)


def test_scores_follow_the_model(tiny_model_dirs):
    """The harness's per-choice log-likelihoods are those of the model handed over (SiLU vs dReLU on the same
    weights), and acc is the share of questions whose correct choice has the highest log-likelihood."""
    from sparsetune.evaluation.downstream import evaluate_tasks, load_tasks
    from sparsetune.models.build import activation_for_hf_config
    from sparsetune.recipe.schema import relufy_config
    from sparsetune.sources.loading import load_model, load_tokenizer
    from sparsetune.surgery.relufy import relufy

    folder = str(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(folder)
    lls, accs = {}, {}
    for activation in ("silu", "drelu"):
        model = load_model(folder)
        relufy(model, activation_for_hf_config(model.config))
        if activation != "silu":
            relufy(model, relufy_config(activation=activation))
        run = evaluate_tasks(model, tokenizer, load_tasks([TASK], str(TASKS)), limit=10, batch_size=4)
        samples = sorted(run.samples[TASK], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(10))
        lls[activation] = [[ll for ll, _greedy in s["filtered_resps"]] for s in samples]
        picked = [max(range(len(ll)), key=ll.__getitem__) for ll in lls[activation]]
        accs[activation] = run.tasks[TASK]["acc"]
        assert accs[activation] == pytest.approx(sum(p == s["target"] for p, s in zip(picked, samples)) / 10)
        assert [len(ll) for ll in lls[activation]] == [len(s["doc"]["choices"]) for s in samples]
    flat = {a: [x for ll in v for x in ll] for a, v in lls.items()}
    assert all(x < 0 for x in flat["silu"])
    assert max(abs(a - b) for a, b in zip(flat["silu"], flat["drelu"])) > 1e-3


def test_bad_input_is_one_line(tiny_model_dirs, tmp_path, monkeypatch, capsys):
    model = str(tiny_model_dirs["llama"])
    line = one_error(capsys, main(["eval", model, "--tasks", "sparsetune_tiny_mcq", "--include-path", str(TASKS)]),
                      r"unknown lm-eval task 'sparsetune_tiny_mcq' \(did you mean sparsetune_tiny_mc")
    assert "--include-path" in line and "internet" in line
    one_error(capsys, main(["eval", model, "--tasks", TASK, "--include-path", str(tmp_path / "nope")]),
               r"--include-path: no such folder: .*nope")
    one_error(capsys, main(["eval", model, "--limit", "5"]), r"--limit apply with --tasks only")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    one_error(capsys, main(["eval", model, "--tasks", TASK, "--include-path", str(TASKS)]),
               r"needs lm-evaluation-harness, which is not installed .*pip install lm-eval")
