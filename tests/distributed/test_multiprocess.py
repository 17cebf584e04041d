"""Real multi-process runs on CPU over gloo: DDP, DeepSpeed ZeRO-2/3 and FSDP2, launched with `--launch`.

One 2-process DDP run is the reference: a single process with twice the micro-batch must match it per step,
and runs under every other engine (each stopped at step 2 and resumed) must end at its weights.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsetune.checkpoint.resume import read_weights
from tests.e2e_helpers import TINY_TRAIN, child_env, logs_with, train_logs, train_steps

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

STEPS = 4
COMMON = [*[o for o in TINY_TRAIN if not o.startswith("train.micro_batch_size")], f"train.max_steps={STEPS}",
          "train.log_every=1", "train.eval_every=0", "train.lr_warmup_steps=0", "regularizer.coef=5.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sparsetune(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sparsetune", *args], capture_output=True, text=True,
                          env=child_env(hooks=True, WANDB_MODE="offline", OMP_NUM_THREADS="1", **(env or {})),
                          timeout=timeout)
    return proc


def launched(model: Path, out: Path, preset: str, *extra: str, env: dict | None = None, processes: int = 2):
    proc = sparsetune("train", "quickstart", f"model.path={model}", f"output_dir={out}", *COMMON,
                      f"train.micro_batch_size={8 // processes}", f"train.eval_batches={2 * processes}", *extra,
                      "--launch", preset, "--num-processes", str(processes), "--main-process-port", str(free_port()),
                      env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return read_weights(run / "checkpoints" / latest / "model")


def assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].numel() > 0, k
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max().item())


def assert_same_training(a: dict, b: dict, init_dir: Path) -> None:
    """Another engine's result equals the reference up to float reduction order: the difference is under 1%
    of how far training moved the weights (a lost optimizer state or a skipped step is ~100%)."""
    init = read_weights(init_dir)
    assert a.keys() == b.keys()
    diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a)
    moved = sum(float((b[k] - init[k]).double().pow(2).sum()) for k in b if k in init)
    assert all(a[k].shape == b[k].shape and a[k].numel() > 0 for k in a)
    assert moved > 0 and (diff / moved) ** 0.5 < 0.01, (diff, moved)


def stop_and_resume(model: Path, run: Path, preset: str) -> str:
    first = launched(model, run, preset, env={"SPARSETUNE_TEST_PREEMPT_AT_STEP": "2"})
    assert "stopped at step 2" in first.stdout
    second = launched(model, run, preset, "--resume")
    assert "resuming from" in second.stdout and "step 2" in second.stdout
    return first.stdout + second.stdout


@pytest.fixture(scope="module")
def ddp_reference(tiny_model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "run"
    proc = launched(tiny_model_dirs["llama"], run, "ddp")
    return run, proc


@pytest.fixture(scope="module")
def single_reference(tiny_model_dirs, tmp_path_factory):
    single = tmp_path_factory.mktemp("single") / "run"
    out = sparsetune("train", "quickstart", f"model.path={tiny_model_dirs['llama']}", f"output_dir={single}",
                     *COMMON, "train.micro_batch_size=8")
    assert out.returncode == 0, out.stderr[-3000:]
    return single


def per_step(run):
    return {r["step"]: r for r in train_logs(run)}


def test_ddp_two_processes_equal_one_process_with_twice_the_batch(ddp_reference, single_reference):
    ddp_run, proc = ddp_reference
    single = single_reference
    assert "2 process(es)" in proc.stdout and "DDP" in proc.stdout
    d, s = per_step(ddp_run), per_step(single)
    assert sorted(d) == list(range(1, STEPS + 1))  # logged once per step: only the main process writes
    for step in d:
        for key in ("train/loss", "train/lm_loss", "train/reg_loss", "train/sparsity"):
            assert d[step][key] == pytest.approx(s[step][key], rel=1e-4, abs=1e-6), (step, key)
    ddp_eval = logs_with(ddp_run, "eval/perplexity")[-1]
    single_eval = logs_with(single, "eval/perplexity")[-1]
    assert ddp_eval["eval/perplexity"] == pytest.approx(single_eval["eval/perplexity"], rel=1e-4)
    assert ddp_eval["eval/sparsity"] == pytest.approx(single_eval["eval/sparsity"], abs=1e-4)
    ckpt = ddp_run / "checkpoints" / (ddp_run / "checkpoints" / "latest").read_text().strip()
    assert (ckpt / "rng_state_rank0.json").is_file() and (ckpt / "rng_state_rank1.json").is_file()
    assert_weights_close(final_weights(ddp_run), final_weights(single), atol=1e-5)  # same 16 held-out sequences


def test_ddp_with_gradient_accumulation_equals_the_same_global_batch(tiny_model_dirs, tmp_path, single_reference):
    run = tmp_path / "accum"
    launched(tiny_model_dirs["llama"], run, "ddp", "train.micro_batch_size=2", "train.grad_accum_steps=2")
    d, s = per_step(run), per_step(single_reference)
    for step in s:
        for key in ("train/loss", "train/lm_loss", "train/sparsity"):
            assert d[step][key] == pytest.approx(s[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert_weights_close(final_weights(run), final_weights(single_reference), atol=1e-5)


def test_ddp_stop_at_step_2_and_resume_ends_at_the_uninterrupted_weights(tiny_model_dirs, tmp_path, ddp_reference):
    run = tmp_path / "run"
    stop_and_resume(tiny_model_dirs["llama"], run, "ddp")
    steps = train_steps(run)
    assert steps == list(range(1, STEPS + 1))
    assert_weights_close(final_weights(run), final_weights(ddp_reference[0]), atol=0)


def _export_matches_checkpoint(run: Path, out: Path, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    proc = sparsetune("export", str(run), "--out", str(out), "--no-eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    # A single-process load of the checkpoint's gathered weights, into the original architecture.
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reference.config.hidden_act = "relu"
    for layer in reference.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    missing, unexpected = reference.load_state_dict(final_weights(run), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, exported.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    for name, tensor in exported.state_dict().items():
        assert tensor.numel() > 0, name


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_deepspeed_zero_trains_resumes_and_exports(tiny_model_dirs, tmp_path, ddp_reference, preset):
    run = tmp_path / "run"
    log = stop_and_resume(tiny_model_dirs["llama"], run, preset)
    assert f"DeepSpeed ZeRO-{preset[-1]}" in log
    if preset == "zero3":  # parameters really partitioned: each rank holds about half
        held = [(int(a.replace(",", "")), int(b.replace(",", "")))
                for a, b in re.findall(r"holds ([\d,]+) of ([\d,]+) parameters", log)]
        assert held and all(h < 0.6 * t for h, t in held), held
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert list((ckpt / "deepspeed" / "engine").glob("*optim_states.pt"))  # each rank's optimizer partition
    assert_same_training(final_weights(run), final_weights(ddp_reference[0]), tiny_model_dirs["llama"])
    _export_matches_checkpoint(run, tmp_path / "export", tiny_model_dirs["llama"])


def test_fsdp2_shards_parameters_resumes_and_exports(tiny_model_dirs, tmp_path, ddp_reference):
    run = tmp_path / "run"
    log = stop_and_resume(tiny_model_dirs["llama"], run, "fsdp")
    held = [(int(a.replace(",", "")), int(b.replace(",", "")))
            for a, b in re.findall(r"holds ([\d,]+) of ([\d,]+) parameters", log)]
    assert len(held) == 4 and all(abs(h - t / 2) <= 0.05 * t for h, t in held), held  # 2 ranks x 2 launches
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert (ckpt / "fsdp_optimizer").is_dir() and not (ckpt / "optimizer.pt").exists()
    assert_same_training(final_weights(run), final_weights(ddp_reference[0]), tiny_model_dirs["llama"])
    _export_matches_checkpoint(run, tmp_path / "export", tiny_model_dirs["llama"])


def test_two_machines_over_loopback(tiny_model_dirs, tmp_path):
    run, port = tmp_path / "run", free_port()
    base = [sys.executable, "-m", "sparsetune", "train", "quickstart", f"model.path={tiny_model_dirs['llama']}",
            f"output_dir={run}", *COMMON, "train.max_steps=2", "train.micro_batch_size=4", "--launch", "ddp",
            "--num-processes", "1", "--num-machines", "2", "--main-process-ip", "127.0.0.1",
            "--main-process-port", str(port)]
    env = child_env(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(base + ["--machine-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "2 process(es)" in outs[0][0]
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert json.loads((ckpt / "trainer_state.json").read_text())["num_processes"] == 2


@pytest.mark.parametrize("preset, overrides, key", [
    ("zero3", ["predictor.enabled=true", "predictor.dynamic_eval_batches=3"], "predictor.dynamic_eval_batches"),
    ("fsdp", ["train.eval_batches=3"], "train.eval_batches"),
    ("zero3", ["thresholds.cett=0.2"], "thresholds.cett"),
    ("fsdp", ["relufy.activation=cats", "compensation.enabled=true"], "compensation.enabled"),
])
def test_impossible_preset_combinations_fail_before_launch(tiny_model_dirs, tmp_path, preset, overrides, key):
    proc = sparsetune("train", "quickstart", f"model.path={tiny_model_dirs['llama']}", f"output_dir={tmp_path / 'r'}",
                      *overrides, "--launch", preset, "--num-processes", "2")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], proc.stderr
    assert "launching" not in proc.stdout and not (tmp_path / "r").exists()
