#!/usr/bin/env bash
# The prepared GPU check: install sparsetune into a venv over the machine's own CUDA torch, run the CUDA tests
# (`pytest -m cuda`, tests/cuda/) and the training-step benchmark (scripts/bench_train_step.py: the smollm2 and 1b
# shapes, sparsetune's Trainer against a bare transformers + AdamW loop), and write one JSON of figures.
#
#   GPU_WHEELS=.gpu-wheels bash scripts/gpu_check.sh     # on the GPU machine, offline (wheels: scripts/gpu_wheels.sh)
#   bash scripts/gpu_check.sh --cpu                      # the same steps on a CPU: the CUDA tests skip, the bench
#                                                        # runs the tiny shape with --device cpu
#
# Environment:
#   PYTHON       the interpreter that holds torch (default python3); it may itself be a venv: its packages are
#                made visible in the new venv too (`--system-site-packages` alone would only see the base's)
#   GPU_VENV     the venv to create or reuse (default /tmp/sparsetune-gpu-venv)
#   GPU_WHEELS   a wheel folder: install from there only (--no-index); without it pip may use an index
#   OUT          folder for the results: $OUT/gpu_check.json (+ pytest.log, bench.log); default ./gpu_check.json
#   GPU_TEST_TIMEOUT / GPU_BENCH_TIMEOUT   seconds for the tests / the bench (default 270 / 150: with the install,
#                under 8 minutes in all)
# The JSON holds torch / CUDA versions, the GPU, the pytest outcome (passed / failed / skipped counts, the failures'
# messages), the bench figures, each step's exit status and seconds, and the interpreter's `pip list --format=freeze`
# (what scripts/gpu_wheels.sh GPU_HAVE= takes to make the next wheel folder exactly what is missing). Exit status:
# 0 when the tests passed (on a GPU: at least one ran) and the bench finished; 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --cpu or nothing)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-/tmp/sparsetune-gpu-venv}
RESULT=${OUT:+$OUT/}gpu_check.json
LOGS=$(mktemp -d)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_SILENT=true TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
declare -A RC SECONDS_OF

# 1. The venv over the interpreter's torch, sparsetune installed editable with pytest.
t0=$(date +%s)
(
  set -e
  "$PYTHON" -m pip list --format=freeze >"$LOGS/freeze.txt" 2>/dev/null || true
  # (an interpreter without ensurepip gets a venv without pip: PYTHON's pip installs into it with --python)
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV" \
    || { rm -rf "$VENV" && "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"; }
  # When PYTHON is a venv, its site-packages (torch) are not the base's: a .pth of the new venv adds them as site
  # folders (after the venv's own, so what is installed here wins; their own .pth files are read too).
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PYTHON" -c "import site; print(''.join(f'import site; site.addsitedir({d!r})\n' for d in site.getsitepackages()))" \
    >"$site/_gpu_check_base.pth"
  "$VENV/bin/python" -c "import torch" || { echo "no torch importable from $PYTHON" >&2; exit 1; }
  pip=("$VENV/bin/python" -m pip)
  "${pip[@]}" --version >/dev/null 2>&1 || pip=("$PYTHON" -m pip --python "$VENV/bin/python")
  src=()
  [ -n "${GPU_WHEELS:-}" ] && src=(--no-index --find-links "$GPU_WHEELS")
  "${pip[@]}" install -q "${src[@]}" "setuptools>=68"
  "${pip[@]}" install -q --no-build-isolation "${src[@]}" -e . pytest pytest-timeout
) 2>&1 | tee "$LOGS/install.log"
RC[install]=${PIPESTATUS[0]}
SECONDS_OF[install]=$(($(date +%s) - t0))
PY="$VENV/bin/python"

"$PY" - "$LOGS/env.json" <<'EOF' || RC[install]=1
import json, sys
import torch
cuda = torch.cuda.is_available()
json.dump({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None, "cuda_available": cuda,
           "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "gpu_count": torch.cuda.device_count(),
           "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
           "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None}, open(sys.argv[1], "w"))
EOF
if [ "$MODE" = gpu ] && [ "${RC[install]}" = 0 ] \
  && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: torch in $VENV sees no CUDA device (run with --cpu for the CPU steps)" >&2
  RC[install]=1
fi

# 2. The CUDA tests (they skip without a GPU), 3. the training-step benchmark.
if [ "${RC[install]}" = 0 ]; then
  t0=$(date +%s)
  timeout -k 10 "${GPU_TEST_TIMEOUT:-270}" "$PY" -m pytest -m cuda -p no:cacheprovider -q -rfEs --timeout 240 \
    --junitxml "$LOGS/junit.xml" 2>&1 | tee "$LOGS/pytest.log"
  RC[tests]=${PIPESTATUS[0]}
  SECONDS_OF[tests]=$(($(date +%s) - t0))
  t0=$(date +%s)
  bench=(--device cuda)
  [ "$MODE" = cpu ] && bench=(--device cpu --shape tiny)
  timeout -k 10 "${GPU_BENCH_TIMEOUT:-150}" "$PY" scripts/bench_train_step.py "${bench[@]}" --json "$LOGS/bench.json" \
    2>&1 | tee "$LOGS/bench.log"
  RC[bench]=${PIPESTATUS[0]}
  SECONDS_OF[bench]=$(($(date +%s) - t0))
fi

# 4. One JSON of figures.
[ -x "$PY" ] || PY=$PYTHON
"$PY" - "$LOGS" "$RESULT" "$MODE" "$(elapsed)" "${RC[install]}" "${RC[tests]:-}" "${RC[bench]:-}" \
  "${SECONDS_OF[install]}" "${SECONDS_OF[tests]:-}" "${SECONDS_OF[bench]:-}" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

logs, result, mode, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
names = ("install", "tests", "bench")
rcs = dict(zip(names, (int(x) if x else None for x in sys.argv[5:8])))
secs = dict(zip(names, (int(x) if x else None for x in sys.argv[8:11])))


def read(name, parse):
    path = logs / name
    return parse(path) if path.is_file() and path.stat().st_size else None


def tail(name, n=4000):
    return read(name, lambda p: p.read_text(errors="replace")[-n:])


def pytest_outcome(path):
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in (c for s in suites for c in s.iter("testcase")):
        for bad in [*case.findall("failure"), *case.findall("error")]:
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": bad.tag,
                           "message": (bad.get("message") or "")[:600], "text": (bad.text or "")[-1500:]})
    return {"passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
            "failed": count["failures"], "errors": count["errors"], "skipped": count["skipped"],
            "total": count["tests"], "failures": failed}


tests = read("junit.xml", pytest_outcome)
ok_tests = rcs["tests"] == 0 and tests is not None and (mode == "cpu" or tests["passed"] > 0)
ok = rcs["install"] == 0 and ok_tests and rcs["bench"] == 0
report = {
    "ok": ok, "mode": mode, "seconds": total, "exit_status": rcs, "step_seconds": secs,
    "environment": read("env.json", lambda p: json.loads(p.read_text())),
    "pytest": tests, "bench": read("bench.json", lambda p: json.loads(p.read_text())),
    "pip_freeze": read("freeze.txt", lambda p: p.read_text().split()),
}
for step, log in (("install", "install.log"), ("tests", "pytest.log"), ("bench", "bench.log")):
    if rcs[step] not in (0, None) or (step == "tests" and rcs[step] == 0 and not ok_tests):
        report[f"{step}_log_tail"] = tail(log)
Path(result).write_text(json.dumps(report, indent=1) + "\n")
t = tests or {}
print(f"gpu_check: {'OK' if ok else 'FAILED'} ({mode}, {total} s): tests {t.get('passed')} passed, "
      f"{t.get('failed')} failed, {t.get('errors')} errors, {t.get('skipped')} skipped; bench exit "
      f"{rcs['bench']}; figures in {result}")
sys.exit(0 if ok else 1)
EOF
status=$?
if [ -n "${OUT:-}" ]; then
  cp "$LOGS"/pytest.log "$LOGS"/bench.log "$OUT"/ 2>/dev/null || true
fi
rm -rf "$LOGS"
exit $status
