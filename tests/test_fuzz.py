"""Property-based fuzzing of every input a rewrite reads: shard headers, the index, the config,
the direction file and the plan of a tiny checkpoint (bfloat16, block FP8 or MXFP4, written
out in the same format or in bf16), each mutated by hypothesis.

For every mutation: either exit 0 with an output that verifies, or exit 1 with exactly one
line and no traceback; the source byte-identical; nothing written outside OUTPUT.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewriter.cli import main
from tests.helpers import TEXT, random_measurements, snapshot
from tests.quantize import CASES, quantized

EXAMPLES = int(os.environ.get("ABLITERATE_FUZZ_EXAMPLES", "200"))  # per run; each is one in-process rewrite
INDEX = "model.safetensors.index.json"

# JSON-ish values that break assumptions: wrong types, huge and negative numbers, hostile names.
WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64), st.floats(allow_nan=True),
    st.sampled_from(["", "..", "../x", "/etc/passwd", "a/../../b", "\x00", "model.safetensors", "F32", "BF16"]),
    st.text(max_size=12), st.lists(st.integers(min_value=-3, max_value=10**12), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _mutate_json(doc: object, path: list[object], value: object) -> object:
    """``doc`` with the element at ``path`` (keys/indices, clipped to what exists) replaced by ``value``."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    new = dict(doc) if isinstance(doc, dict) else list(doc)
    if isinstance(new, list):
        i = path[0] % len(new) if isinstance(path[0], int) else 0
        new[i] = _mutate_json(new[i], path[1:], value)
    else:
        key = list(new)[path[0] % len(new)] if isinstance(path[0], int) else path[0]
        new[key] = _mutate_json(new.get(key), path[1:], value)
    return new


PATHS = st.lists(st.one_of(st.integers(min_value=0, max_value=50), st.sampled_from(
    ["weight_map", "dtype", "shape", "data_offsets", "num_hidden_layers", "hidden_size", "model_type", "ablate",
     "layer", "measurement", "scale", "components", "__metadata__", "quantization_config", "weight_block_size",
     "quant_method", "config_groups", "strategy"])), max_size=4)


def _rewrite_header(shard: Path, path: list[object], value: object) -> None:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = _mutate_json(json.loads(data[8 : 8 + n]), path, value)
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _rewrite_json(file: Path, path: list[object], value: object) -> None:
    file.write_text(json.dumps(_mutate_json(json.loads(file.read_text()), path, value)))


def _flip_bytes(file: Path, offset: int, data: bytes) -> None:
    blob = bytearray(file.read_bytes())
    at = offset % max(len(blob), 1)
    blob[at : at + len(data)] = data
    file.write_bytes(bytes(blob))


TARGETS = ["header", "index", "config", "directions-bytes", "plan", "header-bytes"]


SOURCES = ["bfloat16", "fp8-partial-blocks-apart", "mxfp4-experts"]  # a float source and two quantized ones


@pytest.fixture(scope="module")
def pristine(checkpoint_factory: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Source kind -> (checkpoint, direction file)."""
    sources = {"bfloat16": (checkpoint_factory("llama"), TEXT["hidden_size"], TEXT["num_hidden_layers"])}
    for case in CASES:
        if case.id in SOURCES:
            sources[case.id] = quantized(case, tmp_path_factory.mktemp(case.id))
    made = {}
    for kind, (ckpt, width, layers) in sources.items():
        directions = tmp_path_factory.mktemp("directions") / "d.safetensors"
        random_measurements(width, layers).save(directions)
        made[kind] = (ckpt, directions)
    return made


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=st.sampled_from(SOURCES), output_format=st.sampled_from(["same", "bf16"]),
       target=st.sampled_from(TARGETS), path=PATHS, value=WEIRD, offset=st.integers(min_value=0, max_value=2**20),
       noise=st.binary(min_size=1, max_size=8))
def test_mutated_inputs_fail_cleanly_or_succeed(pristine: dict[str, tuple[Path, Path]], source: str, output_format: str,
                                                target: str, path: list[object], value: object, offset: int,
                                                noise: bytes) -> None:
    ckpt, directions = pristine[source]
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        box = Path(tmp)
        src = Path(shutil.copytree(ckpt, box / "src"))
        shutil.copy(directions, box / "d.safetensors")
        (box / "sibling").mkdir()
        (box / "sibling" / "keep.txt").write_text("must survive")
        plan = box / "plan.yml"
        plan.write_text(json.dumps({"ablate": [{"layer": n, "measurement": 1} for n in range(4)]}))
        shard = sorted(src.glob("*.safetensors"))[offset % len(list(src.glob("*.safetensors")))]
        {
            "header": lambda: _rewrite_header(shard, path, value),
            "header-bytes": lambda: _flip_bytes(shard, offset % 400, noise),
            "index": lambda: _rewrite_json(src / INDEX, ["weight_map", *path], value),
            "config": lambda: _rewrite_json(src / "config.json", path, value),
            "directions-bytes": lambda: _flip_bytes(box / "d.safetensors", offset, noise),
            "plan": lambda: _rewrite_json(plan, path, value),
        }[target]()
        before = snapshot(box)
        out = box / "out"
        result = CliRunner().invoke(main, ["rewrite", str(src), str(out), "-d", str(box / "d.safetensors"),
                                           "--plan", str(plan), "-q", "--output-format", output_format])
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        if result.exit_code == 0:
            verified = CliRunner().invoke(main, ["verify", str(src), str(out), "-q"])
            assert verified.exit_code == 0, verified.output
        else:
            assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        after = snapshot(box)
        assert {k: v for k, v in after.items() if not k.startswith("out/")} == before
