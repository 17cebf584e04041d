"""Bad input: one `error:` line naming the problem, exit code 2, no traceback, no run folder left behind."""

from functools import partial
from types import SimpleNamespace

import pytest

from tests.e2e_helpers import run_cli

pytestmark = pytest.mark.e2e


def _assert_clean_error(proc, pattern):
    import re

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr


def in_process(capsys, *args: str) -> SimpleNamespace:
    """`sparsetune ARGS` in this process (an exception other than the CLI's own handling would fail the test)."""
    from sparsetune.cli import main

    capsys.readouterr()
    code = main(list(args))
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def test_cli_errors(tmp_path, tiny_model_dirs, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path / "run"
    # one in a fresh process, as a user's shell sees it (exit status, stderr); the rest in this one
    _assert_clean_error(run_cli("train", "quickstart", f"output_dir={out}", "train.max_step=3"),
                        r"unknown recipe key 'train.max_step'; did you mean 'train.max_steps'")
    cli = partial(in_process, capsys)
    _assert_clean_error(cli("validate", "quickstart", "relufy.activation=gelu"),
                        r"'relufy.activation' = 'gelu' is not allowed; expected 'silu', 'relu'")
    _assert_clean_error(cli("train", "quickstart", f"output_dir={out}", f"model.path={tmp_path}/nope"),
                        r"model.path: no such model folder or file: .*nope")
    _assert_clean_error(cli("train", "quickstart", f"output_dir={out}", f"model.path={tiny_model_dirs['llama']}",
                                f"data.path={tmp_path}/missing.txt"), r"data.path: file not found: .*missing.txt")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(gpt2)
    (tiny_model_dirs["llama"] / "tokenizer.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2 / name).write_bytes((tiny_model_dirs["llama"] / name).read_bytes())
    _assert_clean_error(cli("train", "quickstart", f"output_dir={out}", f"model.path={gpt2}",
                                "data.seq_len=32"), r"model type 'gpt2' has no SwiGLU MLP")
    assert not out.exists(), "no run folder is left behind by a run that never started"
    _assert_clean_error(cli("export", str(tmp_path / "no_run"), "--out", str(tmp_path / "x")),
                        r"no such run or checkpoint folder")
    _assert_clean_error(cli("train", "nonexistent_recipe"), r"no recipe file or built-in recipe named")


def test_existing_run_needs_overwrite(tmp_path, tiny_model_dirs):
    from tests.e2e_helpers import train_tiny

    out = tmp_path / "run"
    assert train_tiny(tiny_model_dirs["llama"], out, "train.max_steps=1", "train.eval_every=0",
                      "wandb.mode=disabled") == 0
    proc = run_cli("train", "quickstart", f"output_dir={out}", f"model.path={tiny_model_dirs['llama']}")
    _assert_clean_error(proc, r"output_dir .* already holds a run; choose another output_dir, "
                              r"continue it with --resume, or pass --overwrite")
    assert (out / "checkpoints").is_dir()
    assert train_tiny(tiny_model_dirs["llama"], out, "train.max_steps=2", "train.eval_every=0",
                      "wandb.mode=disabled", "--overwrite") == 0
