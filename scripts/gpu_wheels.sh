#!/usr/bin/env bash
# Fill a wheel folder (default .gpu-wheels/) with sparsetune's dependencies other than torch, for a GPU machine
# that has a CUDA torch but no internet; run it on a machine that reaches PyPI, then there:
#   GPU_WHEELS=.gpu-wheels bash scripts/gpu_check.sh
#
#   bash scripts/gpu_wheels.sh                           # for CPython 3.12 on manylinux x86_64 (glibc >= 2.28)
#   GPU_PYTHON_VERSION=3.11 GPU_GLIBC=2.35 bash scripts/gpu_wheels.sh DIR
#   GPU_HAVE=have.txt bash scripts/gpu_wheels.sh         # only what the GPU machine lacks
#
# What: the `dependencies` of pyproject.toml without torch, plus pytest and pytest-timeout (what gpu_check.sh runs)
# and setuptools (sparsetune's build backend), with everything they need, as wheels for the target Python.
# torch is the GPU machine's own: a stub wheel (no files, no requirements) stands in for it while pip resolves, so
# neither torch nor its CUDA libraries are downloaded. DeepSpeed is published as a source archive only: it is built
# here into a pure-Python wheel (its CUDA ops are compiled at first use there, not now; this needs a local torch).
#
# GPU_HAVE: what the GPU machine already holds, one project a line. `NAME==VERSION` lines (`python3 -m pip list
# --format=freeze` run there) get stubs too, so pip resolves against those very versions and downloads only what
# is missing or too old there; a bare `NAME` line (a name without its version, e.g. from a package list) removes
# that project's wheel afterwards if it weighs over 1 MiB: a guess, so the small ones stay as cheap insurance, and
# where a big one's version there does not satisfy, the install there fails naming it. With no GPU_HAVE the folder
# holds the whole closure (right for any machine with torch; about 160 MB for CPython 3.12). Prints its size.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PY=${PYTHON:-python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
GLIBC_MAX=${GPU_GLIBC:-2.28}
mkdir -p "$DEST"
find "$DEST" -maxdepth 1 -name '*.whl' ! -name 'deepspeed-*' -delete  # a fresh set (the DeepSpeed build is kept)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The requirements: pyproject.toml's dependencies without torch, and what the check itself runs.
"$PY" - "$work/requirements.txt" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
name = lambda r: re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower()
reqs = [r for r in project["dependencies"] if name(r) != "torch"]
test = {name(r): r for r in project["optional-dependencies"]["test"]}
reqs += [test["pytest"], test["pytest-timeout"], "setuptools>=68"]
open(sys.argv[1], "w").write("\n".join(reqs) + "\n")
EOF

# Stubs: torch (at the version GPU_HAVE gives, else the local torch's) and every NAME==VERSION line of GPU_HAVE.
LOCAL_TORCH=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || echo 2.11.0)
mkdir -p "$work/stub"
"$PY" - "$work/stub" "$work/constraints.txt" "$work/skip.txt" "$LOCAL_TORCH" "${GPU_HAVE:-}" <<'EOF'
import re, sys, zipfile
stub_dir, constraints, skip, local_torch, have = sys.argv[1:6]
versions, names = {"torch": local_torch}, []
for line in (open(have).read().splitlines() if have else []):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = (part.strip() for part in line.split("==", 1))
        versions[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+")[0]
    elif line:
        names.append(line)
for name, version in versions.items():
    version += "+stub"
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_wheels.sh\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(f"{stub_dir}/{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
open(constraints, "w").write("".join(f"{n}=={v}+stub\n" for n, v in versions.items()))
open(skip, "w").write("".join(f"{n}\n" for n in names))
EOF

# DeepSpeed: no wheel on PyPI; build one from the source archive with the local torch (no ops compiled: DS_BUILD_OPS=0).
ds_req=$(grep -i '^deepspeed' "$work/requirements.txt")
if grep -qi '^deepspeed==' "$work/constraints.txt"; then
  rm -f "$DEST"/deepspeed-*.whl  # the GPU machine has it
elif ! ls "$DEST"/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$ds_req"
fi

platforms=()
for ((n = ${GLIBC_MAX#2.}; n >= 17; n--)); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q -d "$DEST" --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" --find-links "$work/stub" --find-links "$DEST" -c "$work/constraints.txt" \
  -r "$work/requirements.txt"
rm -f "$DEST"/*+stub-py3-none-any.whl
while read -r project; do
  pattern=$(echo "$project" | tr 'A-Z.-' 'a-z__')
  find "$DEST" -maxdepth 1 -iname "${pattern}-*.whl" -size +1024k -print -delete | sed 's/^/left out (GPU_HAVE): /'
done <"$work/skip.txt"
echo "$(ls "$DEST"/*.whl | wc -l) wheels in $DEST, $(du -sh "$DEST" | cut -f1)"
