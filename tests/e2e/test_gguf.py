"""GGUF checkpoints: any local GGUF file loads (dequantized once into a cache), the cache is reused and repaired."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_writer import write_tiny_gguf

from fedpeft import gguf
from fedpeft.models import ModelLoadError, build_model, load_tokenizer
from fedpeft.app.recipe import validate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf.CACHE_ENV, str(root))
    return root


@pytest.fixture()
def tiny_file(tmp_path) -> tuple[Path, np.ndarray]:
    path = tmp_path / "models" / "tiny-llama.Q8_0.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path)


def _cfg(path: Path, kind: str = "causal-lm"):
    return validate({"model": {"kind": kind, "source": "gguf", "path": str(path), "max_length": 32}})


def test_a_gguf_file_loads_dequantized_with_its_tokenizer(cache, tiny_file):
    path, embedding = tiny_file
    cfg = _cfg(path)
    model = build_model(cfg, 0)
    tok = load_tokenizer(cfg.model)
    base = model.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM"
    # The Q8_0 embedding comes back within its quantization step (a 1/127 of each block's max).
    got = base.get_input_embeddings().weight.detach().numpy()
    assert np.abs(got - embedding).max() <= np.abs(embedding).max() / 127 + 1e-6
    ids = tok("the cat", return_tensors="pt")
    assert torch.isfinite(model(**ids).logits).all()
    assert tok.eos_token == "<|im_end|>"
    (folder,) = (cache / "gguf").glob("tiny-llama.Q8_0-*[!k]")  # the folder, not its lock file
    assert (folder / "model.safetensors").is_file() and (folder / gguf.MANIFEST).is_file()


def test_the_second_load_reads_the_cache(cache, tiny_file, monkeypatch):
    path, _ = tiny_file
    first = gguf.dequantized(path)

    def no_build(*_):
        raise AssertionError("rebuilt although the cache is complete")

    monkeypatch.setattr(gguf, "_build", no_build)
    assert gguf.dequantized(path) == first
    build_model(_cfg(path), 0)  # model and tokenizer from the cache folder


def test_a_truncated_cache_is_rebuilt(cache, tiny_file):
    path, _ = tiny_file
    folder = gguf.dequantized(path)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert gguf.dequantized(path) == folder
    assert weights.stat().st_size == size
    build_model(_cfg(path), 0)


def test_a_damaged_cache_that_fails_to_load_is_rebuilt(cache, tiny_file):
    path, _ = tiny_file
    folder = gguf.dequantized(path)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\xff" * size)  # same size, so only the load notices
    model = build_model(_cfg(path), 0)
    assert torch.isfinite(model.get_base_model().get_input_embeddings().weight).all()
    assert weights.read_bytes()[:8] != b"\xff" * 8


def test_an_edited_gguf_file_gets_its_own_cache_folder(cache, tiny_file):
    path, _ = tiny_file
    first = gguf.dequantized(path)
    write_tiny_gguf(path, seed=1)
    second = gguf.dequantized(path)
    assert first != second and first.exists() and second.exists()


def test_processes_that_start_together_build_the_cache_once(cache, tiny_file, tmp_path):
    path, _ = tiny_file
    log = tmp_path / "builds.log"
    script = (
        "import sys; from fedpeft import gguf\n"
        "orig = gguf._build\n"
        "def logged(*a):\n"
        f"    open({str(log)!r}, 'a').write('build\\n'); orig(*a)\n"
        "gguf._build = logged\n"
        f"print(gguf.dequantized({str(path)!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outs) == 1 and log.read_text().count("build") == 1
    assert not list((cache / "gguf").glob("*.tmp-*"))


def test_an_architecture_transformers_cannot_read_is_named(cache, tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, arch="frobnicator")
    with pytest.raises(ModelLoadError, match="'frobnicator' model, which transformers cannot dequantize"):
        build_model(_cfg(path), 0)


def test_a_file_that_is_not_gguf_or_missing_is_named(cache, tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        build_model(_cfg(bad), 0)
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        build_model(_cfg(tmp_path / "absent.gguf"), 0)


def test_a_gguf_decoder_also_loads_as_a_classifier(cache, tiny_file):
    path, _ = tiny_file
    model = build_model(_cfg(path, kind="classifier"), 3)
    tok = load_tokenizer(_cfg(path, kind="classifier").model)
    batch = tok(["the cat", "a"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 3)


def test_the_embedded_causal_default_is_smollm2():
    cfg = validate({"model": {"kind": "causal-lm"}})
    tok = load_tokenizer(cfg.model)
    assert "im_start" in tok.chat_template
    assert gguf.smollm2_file().name == gguf.SMOLLM2_FILE
    assert validate({}).model.embedded == "auto"  # classifiers keep MiniLM-L6
