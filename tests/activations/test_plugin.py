"""The activation protocol: an activation is one file. A copy of the package with one file added (relu6.py from
this folder) trains, checkpoints, exports exactly to plain transformers and evaluates, with no other edit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import sparsetune
from tests.e2e_helpers import TINY_TRAIN, child_env

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from sparsetune.cli import main
from sparsetune.models.build import SparseModel
from sparsetune.recipe.schema import ACTIVATIONS

model_dir, run, out, overrides, recipe = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
assert "relu6" in ACTIVATIONS
rc = main(["train", recipe, f"model.path={model_dir}", f"output_dir={run}", "relufy.activation=relu6",
           "train.max_steps=3", "train.eval_every=0", *overrides])
assert rc == 0, rc
trained = SparseModel.from_source(run).model.eval()
assert main(["export", run, "--out", out, "--no-eval"]) == 0
plain = AutoModelForCausalLM.from_pretrained(out).eval()
ids = torch.randint(0, plain.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ours, theirs = trained(ids).logits, plain(ids).logits
print(json.dumps({"hidden_act": plain.config.hidden_act, "max_diff": float((ours - theirs).abs().max()),
                  "spec": json.load(open(f"{out}/sparsetune.json"))["activation"],
                  "eval": main(["eval", out, "--batches", "1", "--json", f"{out}/eval.json"])}))
"""


def test_an_activation_added_as_one_file_runs_through_train_export_and_eval(tiny_model_dirs, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(Path(sparsetune.__file__).parent, copy / "sparsetune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).parent / "relu6.py", copy / "sparsetune" / "activations" / "relu6.py")
    env = child_env(WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(REPO)])  # the copy's sparsetune, the repo's tests helpers
    run, out = tmp_path / "run", tmp_path / "export"
    args = [str(tiny_model_dirs["llama"]), str(run), str(out), json.dumps(TINY_TRAIN[:-1]),
            str(REPO / "recipes" / "quickstart.yaml")]  # the recipe by path: the copy has no sparsetune.recipes
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)  # not the repo: its own sparsetune would come first
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hidden_act"] == "relu6" and result["spec"] == {"activation": "relu6"}
    assert result["max_diff"] < 1e-5  # plain transformers computes the trained activation exactly
    assert result["eval"] == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["activation"] == {"activation": "relu6"} and report["sparsity"] > 0  # exact zeros counted
