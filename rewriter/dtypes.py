"""One dtype vocabulary for everything a user types or reads: torch's names (``float32``,
``bfloat16``, ...). safetensors' codes (``F32``, ``BF16``) stay inside the file reader."""
from __future__ import annotations

from typing import Any

from .errors import AbliterateError

NAMES = ("float16", "bfloat16", "float32", "float64")
# Short names accepted on the command line, for compatibility with earlier versions.
ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
# safetensors dtype code -> name, for the float dtypes that can be edited
SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
PRECISIONS = ("float32", "float64")  # dtypes of the edit arithmetic
RUN_DTYPES = ("float32", "bfloat16", "float16")  # dtypes a model can run in for measure/evaluate


def __getattr__(name: str) -> Any:
    """The torch dtype tables, made on first use, so that the command line can list its
    options and read headers without importing torch: ``DTYPES`` (name -> dtype),
    ``FLOAT_DTYPES`` (safetensors code -> dtype, the editable floats) and ``STORED_DTYPES``
    (every code a codec may read or write as a tensor: quantized parts and their scales);
    ``BITS`` (element size in bytes -> the signed integer dtype that views a tensor's bits)."""
    if name not in ("DTYPES", "FLOAT_DTYPES", "STORED_DTYPES", "BITS"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    dtypes = {n: getattr(torch, n) for n in NAMES}
    floats = {code: dtypes[n] for code, n in SAFETENSORS_FLOATS.items()}
    stored = {**floats, **{code: getattr(torch, _OTHER_NAMES[code]) for code in _STORED_OTHERS}}
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    globals().update(DTYPES=dtypes, FLOAT_DTYPES=floats, STORED_DTYPES=stored, BITS=bits)
    return globals()[name]


def dtype_name(text: str, allowed: tuple[str, ...] = NAMES) -> str:
    """The canonical name of ``text`` (aliases resolved), if it is one of ``allowed``."""
    name = ALIASES.get(text, text)
    if name not in allowed:
        raise AbliterateError(f"dtype '{text}' is not one of {', '.join(allowed)}")
    return name


# the other safetensors codes, named as torch names them
_OTHER_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                "U32": "uint32", "I64": "int64", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2", "C64": "complex64"}
_STORED_OTHERS = ("U8", "I8", "I16", "I32", "I64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "BOOL")


def stored_name(code: str) -> str:
    """A safetensors dtype code in this vocabulary (``BF16`` -> ``bfloat16``, ``I8`` -> ``int8``)."""
    return SAFETENSORS_FLOATS.get(code) or _OTHER_NAMES.get(code, code.lower())
