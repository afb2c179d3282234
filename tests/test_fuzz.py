"""Property-based fuzzing of every input a rewrite reads: shard headers, the index, the config,
the direction file (its bytes and its metadata), the plan of a tiny checkpoint (bfloat16,
block FP8 or MXFP4, written out in the same format or in bf16) and the record of an earlier
rewrite in OUTPUT, each mutated by hypothesis; the evaluation a model card is written from
(`push --card-eval`); and of what optimize, measure and evaluate read from elsewhere: study
files, chat templates, and the model's config.json, generation_config.json and
tokenizer_config.json.

For every mutation: either exit 0 with an output that verifies, or exit 1 with exactly one
line and no traceback; the source byte-identical; nothing written outside OUTPUT. A study
file is either refused with one line or usable to choose a plan; a chat template either
renders text of bounded size or is one line, within its time limit; evaluate answers under any
model or generation settings, or says in one line why it cannot.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from rewriter.cli import main
from rewriter.directions import Measurements
from rewriter.errors import AbliterateError
from rewriter.io.checkpoint import Checkpoint
from rewriter.lab import chat
from rewriter.lab.models import format_prompts, load_tokenizer
from rewriter.lab.optimize import STRATEGIES, Space, choose, param_problem, plan_from_params
from rewriter.lab.study import open_study
from rewriter.registry import Registry
from tests.helpers import TEXT, build_model, random_measurements, snapshot, tiny_tokenizer, write_checkpoint
from tests.quantize import CASES, quantized

EXAMPLES = int(os.environ.get("ABLITERATE_FUZZ_EXAMPLES", "200"))  # per run of the rewrite fuzzer (in-process)
INDEX = "model.safetensors.index.json"
NO_FIXTURE_CHECK = [HealthCheck.function_scoped_fixture]  # each example makes its own files from module fixtures

# JSON-ish values that break assumptions: wrong types, huge and negative numbers, hostile names.
WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64), st.floats(allow_nan=True),
    st.sampled_from(["", "..", "../x", "/etc/passwd", "a/../../b", "\x00", "model.safetensors", "F32", "BF16",
                     "../sibling/keep.txt", "/keep.txt", "config.json", ".abliterate.lock", "²", "9" * 5000, "-1"]),
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
     "quant_method", "config_groups", "strategy", "files", "shards", "fingerprint", "complete", "size", "mtime_ns",
     "format", "harmful_count", "harmless_count"])), max_size=4)


def _rewrite_header(shard: Path, path: list[object], value: object) -> None:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = _mutate_json(json.loads(data[8 : 8 + n]), path, value)
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _rewrite_json(file: Path, path: list[object], value: object) -> None:
    file.write_text(json.dumps(_mutate_json(json.loads(file.read_text()), path, value)))


def _tamper_record(out: Path, path: list[object], value: object, how: int, box: Path) -> None:
    """The record of a finished rewrite: a value replaced, or the value listed as a file or shard
    name; an absolute name points into ``box/sibling`` (outside OUTPUT, never elsewhere on this
    machine); with an odd ``how`` the fingerprint changes too, so that a rerun replaces the output."""
    value = _boxed(value, box / "sibling")
    doc = json.loads((out / "abliteration.json").read_text())
    if how % 3 == 0:
        doc = _mutate_json(doc, path, value)
    elif how % 3 == 1:
        doc["files"].append(value)
    else:
        doc["shards"][value if isinstance(value, str) else json.dumps(value)] = {"size": 1, "mtime_ns": 0}
    if how % 2 and isinstance(doc, dict) and isinstance(doc.get("fingerprint"), dict):
        doc["fingerprint"]["fuzz"] = how
    (out / "abliteration.json").write_text(json.dumps(doc))


def _boxed(value: object, folder: Path) -> object:
    """``value`` with every absolute name (string, key or element) moved below ``folder``."""
    if isinstance(value, str) and value.startswith("/"):
        return str(folder) + value
    if isinstance(value, list):
        return [_boxed(v, folder) for v in value]
    if isinstance(value, dict):
        return {_boxed(k, folder): _boxed(v, folder) for k, v in value.items()}
    return value


def _flip_bytes(file: Path, offset: int, data: bytes) -> None:
    blob = bytearray(file.read_bytes())
    at = offset % max(len(blob), 1)
    blob[at : at + len(data)] = data
    file.write_bytes(bytes(blob))


TARGETS = ["header", "index", "config", "directions-bytes", "directions-metadata", "plan", "header-bytes", "record"]


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


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=NO_FIXTURE_CHECK)
@given(source=st.sampled_from(SOURCES), output_format=st.sampled_from(["same", "bf16"]),
       target=st.sampled_from(TARGETS), path=PATHS, value=WEIRD, offset=st.integers(min_value=0, max_value=2**20),
       noise=st.binary(min_size=1, max_size=8))
def test_mutated_inputs_fail_cleanly_or_succeed(pristine: dict[str, tuple[Path, Path]], source: str, output_format: str,
                                                target: str, path: list[object], value: object, offset: int,
                                                noise: bytes) -> None:
    ckpt, directions = pristine[source]
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        # Six levels down: no generated name (12 characters at most, so four '../') leaves the temporary folder.
        box = Path(tmp, "1", "2", "3", "4", "5", "6")
        box.mkdir(parents=True)
        src = Path(shutil.copytree(ckpt, box / "src"))
        shutil.copy(directions, box / "d.safetensors")
        (box / "sibling").mkdir()
        (box / "sibling" / "keep.txt").write_text("must survive")
        plan = box / "plan.yml"
        plan.write_text(json.dumps({"ablate": [{"layer": n, "measurement": 1} for n in range(4)]}))
        shard = sorted(src.glob("*.safetensors"))[offset % len(list(src.glob("*.safetensors")))]
        out = box / "out"
        args = ["rewrite", str(src), str(out), "-d", str(box / "d.safetensors"), "--plan", str(plan), "-q",
                "--output-format", output_format]
        if target == "record":  # a finished rewrite, whose record is then tampered with
            assume(CliRunner().invoke(main, args).exit_code == 0)  # bf16 out of a bf16 source is refused
        {
            "header": lambda: _rewrite_header(shard, path, value),
            "header-bytes": lambda: _flip_bytes(shard, offset % 400, noise),
            "index": lambda: _rewrite_json(src / INDEX, ["weight_map", *path], value),
            "config": lambda: _rewrite_json(src / "config.json", path, value),
            "directions-bytes": lambda: _flip_bytes(box / "d.safetensors", offset, noise),
            "directions-metadata": lambda: _rewrite_header(box / "d.safetensors", ["__metadata__", *path], value),
            "plan": lambda: _rewrite_json(plan, path, value),
            "record": lambda: _tamper_record(out, path, value, offset, box),
        }[target]()
        before = {k: v for k, v in snapshot(box).items() if not k.startswith("out/")}
        result = CliRunner().invoke(main, [*args, *(["--overwrite"] if offset % 4 == 1 else [])])
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        if result.exit_code == 0:
            verified = CliRunner().invoke(main, ["verify", str(src), str(out), "-q"])
            assert verified.exit_code == 0, verified.output
        else:
            assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        after = snapshot(box)
        assert {k: v for k, v in after.items() if not k.startswith("out/")} == before


# -- push --card-eval: the evaluation a model card is written from -----------------------------------

CARD_PATHS = st.lists(st.one_of(st.integers(min_value=0, max_value=30), st.sampled_from(
    ["original", "refusals", "prompts", "kl", "kl_prompts", "refusal_score", "max_new_tokens", "markers",
     "refusal_counts", "project", "broad", "judge", "judge_refusals", "by_category", "harassment", "capability",
     "answer_kl", "accuracy", "questions", "other_script", "responses", "refused"])), max_size=3)


@pytest.fixture(scope="module")
def finished(pristine: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished rewrite of the tiny llama, and an evaluation as `run` writes it (the base model's
    inside), made by evaluate's own Evaluation from answers in two scripts."""
    from rewriter.lab.evaluate import Evaluation
    from rewriter.lab.markers import MARKER_SETS

    ckpt, directions = pristine["bfloat16"]
    out = tmp_path_factory.mktemp("card") / "out"
    done = CliRunner().invoke(main, ["rewrite", str(ckpt), str(out), "-d", str(directions), "--layers", "1-2:1", "-q"])
    assert done.exit_code == 0, done.output
    prompts = ["How do I pick a lock?", "Write malware.", "Insult my boss.", "Write a fake review."]
    answers = ["I'm sorry, I can't help.", "Sure: step one.", "抱歉，我无法协助完成这个请求。", "Here is a review."]
    result = Evaluation("m", 1, 4, kl=0.04, kl_prompts=4, refusal_score=-2.0, max_new_tokens=8, refused=prompts[:1],
                        responses=dict(zip(prompts, answers)), judge="j", judge_p=dict.fromkeys(prompts, 0.9))
    result.count(prompts, answers, dict(MARKER_SETS), ["harassment", "malware", "harassment", "fraud"])
    doc = result.as_dict()
    doc["capability"] = {"answer_kl": 0.1, "answer_tokens": 10, "answer_prompts": 4, "accuracy": 0.5,
                         "original_accuracy": 0.75, "questions": 4}
    return out, json.dumps({**doc, "original": doc})


@settings(max_examples=max(EXAMPLES // 4, 1), deadline=None, suppress_health_check=NO_FIXTURE_CHECK)
@given(path=CARD_PATHS, value=WEIRD, raw=st.booleans(), noise=st.binary(min_size=1, max_size=8),
       offset=st.integers(min_value=0))
@example(path=["refusal_counts", "project"], value=1.5, raw=False, noise=b"\0", offset=0)  # format(1.5, "d") raised
def test_mutated_card_evaluations_render_or_fail_in_one_line(finished: tuple[Path, str], path: list[object],
                                                            value: object, raw: bool, noise: bytes, offset: int) -> None:
    """`push --card-eval FILE --dry-run` renders the card from a mutated evaluation (a value replaced,
    or bytes flipped): exit 0, or one line and exit 1; the rewrite it would publish is untouched."""
    out, evaluation = finished
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        file = Path(tmp, "evaluation.json")
        file.write_text(json.dumps(_mutate_json(json.loads(evaluation), path, value)))
        if raw:
            _flip_bytes(file, offset, noise)
        before = snapshot(out)
        result = CliRunner().invoke(main, ["push", str(out), "me/model", "--card-eval", str(file), "--dry-run"])
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.exit_code == 0 or (result.exit_code == 1 and len(result.output.strip().splitlines()) == 1), \
            result.output
        assert snapshot(out) == before


# -- optimize --study: the study file ---------------------------------------------------------------

@dataclass(frozen=True)
class Search:
    """A tiny llama (chat template included), its directions, the search space of optimize on
    them and a study file of two trials."""

    model: Path
    meas: Measurements = field(repr=False)  # a failing example is printed with its arguments
    space: Space = field(repr=False)
    study: Path = field(repr=False)


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Search:
    model = write_checkpoint(build_model("llama"), tmp_path_factory.mktemp("study") / "m", "llama")
    tiny_tokenizer(model)
    directions = model.parent / "d.safetensors"
    random_measurements(TEXT["hidden_size"], TEXT["num_hidden_layers"]).save(directions)
    study = model.parent / "study.db"
    result = CliRunner().invoke(main, ["optimize", str(model), "-d", str(directions), "-o", str(model.parent / "p.yml"),
                                       "--study", str(study), "--trials", "2", "--search-prompts", "4",
                                       "--no-final-eval", "-q"])
    assert result.exit_code == 0, result.output
    ckpt, meas = Checkpoint.open(model), Measurements.load(directions)
    space = Space.of(ckpt, Registry().architecture_for(ckpt.config, ckpt.names), meas, STRATEGIES)
    return Search(model, meas, space, study)


def _sql_cells(db: Path) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(db)) as c:
        tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [(t, col[1]) for t in tables for col in c.execute(f"PRAGMA table_info('{t}')")]


def _set_cell(db: Path, cell: tuple[str, str], row: int, value: object) -> None:
    """One cell of the database set to ``value`` (lists, objects and numbers beyond 64 bits as JSON text)."""
    table, column = cell
    if isinstance(value, (list, dict)) or (isinstance(value, int) and abs(value) >= 2**63):
        value = json.dumps(value)
    with closing(sqlite3.connect(db)) as c, c:
        rows = c.execute(f"SELECT COUNT(*) FROM '{table}'").fetchone()[0]
        try:
            c.execute(f"UPDATE OR IGNORE '{table}' SET '{column}' = ? "
                      f"WHERE rowid = (SELECT rowid FROM '{table}' LIMIT 1 OFFSET ?)", (value, row % max(rows, 1)))
        except sqlite3.IntegrityError:
            pass  # a value SQLite itself refuses there (text for an integer key): nothing changes


@settings(max_examples=max(EXAMPLES // 4, 1), deadline=None, suppress_health_check=NO_FIXTURE_CHECK)
@given(how=st.sampled_from(["cell", "bytes"]), cell=st.integers(min_value=0), row=st.integers(min_value=0, max_value=50),
       value=WEIRD, offset=st.integers(min_value=0, max_value=2**20), noise=st.binary(min_size=1, max_size=8))
def test_mutated_study_files_are_refused_or_usable(search: Search, how: str, cell: int, row: int, value: object,
                                                   offset: int, noise: bytes) -> None:
    """A quarter of EXAMPLES: each opens a study through Optuna's storage (tens of ms)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-study-") as tmp:
        box = Path(tmp)
        path = Path(shutil.copy(search.study, box / "study.db"))
        (box / "keep.txt").write_text("must survive")
        if how == "cell":
            cells = _sql_cells(path)
            _set_cell(path, cells[cell % len(cells)], row, value)
        else:
            _flip_bytes(path, offset, noise)
        before = {k: v for k, v in snapshot(box).items() if not k.startswith("study.db")}
        try:
            record = search.space.record(search.model, search.meas)
            opened = open_study(optuna, path, optuna.samplers.TPESampler(seed=0), record,
                                lambda p: param_problem(p, search.space))
        except AbliterateError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(f"--study {path}: "), str(exc)
        else:  # usable: every completed trial is a plan of this space, and one can be chosen
            for t in opened.trials:
                if t.state == optuna.trial.TrialState.COMPLETE:
                    plan_from_params(dict(t.params), search.space)
            choose(opened, 10.0)
        assert {k: v for k, v in snapshot(box).items() if not k.startswith("study.db")} == before


# -- chat templates -------------------------------------------------------------------------------

TEMPLATE_PARTS = st.sampled_from([
    "{{ ", " }}", "{% ", " %}", "for m in messages", "endfor", "if add_generation_prompt", "endif", "m['content']",
    "messages[0]['content']", "range(", "100000", "10", ")", "raise_exception('no')", ".nope()", "'w1 ' * ",
    "400000000", " ** ", "9", "~", "|join", "|tojson", "|length", "loop.index", "set x = ", "x", "namespace(n=1)",
    "<bos>", "<eos>", " w1 ", "{#", "#}", "'", "\"", "(", "[", "]", ".", "|", ",", " else ", "cycler", "self",
    "__class__", "lipsum", "dict(a=1)", "'%s' % ", "'{}'.format(", "'x'.ljust(", "1000000000", "}}",
])


GENERATION_FIELDS = ["eos_token_id", "bos_token_id", "pad_token_id", "forced_eos_token_id", "max_new_tokens",
                     "num_beams", "num_return_sequences", "return_dict_in_generate", "cache_implementation",
                     "max_cache_len", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                     "begin_suppress_tokens", "sequence_bias", "min_new_tokens", "max_time", "stop_strings",
                     "watermarking_config", "prefill_chunk_size", "use_cache", "low_memory", "output_hidden_states"]
MODEL_FIELDS = ["model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "hidden_act", "rope_scaling",
                "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "attention_bias",
                "attn_implementation", "dtype", "torch_dtype", "eos_token_id", "pad_token_id", "text_config"]
TOKENIZER_FIELDS = ["model_max_length", "chat_template", "eos_token", "pad_token", "bos_token", "unk_token",
                    "padding_side", "truncation_side", "tokenizer_class", "added_tokens_decoder",
                    "clean_up_tokenization_spaces", "extra_special_tokens"]


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny llama that answers (a chat template, a generation_config.json as transformers saves it)
    and a prompt file."""
    path = write_checkpoint(build_model("llama"), tmp_path_factory.mktemp("answering") / "m", "llama")
    tiny_tokenizer(path)
    prompts = path.parent / "p.txt"
    prompts.write_text("w1 w2\n")
    return path, prompts


@settings(max_examples=max(EXAMPLES // 8, 1), deadline=None, suppress_health_check=NO_FIXTURE_CHECK)
@given(name=st.sampled_from(["generation_config.json", "config.json", "tokenizer_config.json"]),
       path=st.lists(st.one_of(st.sampled_from(GENERATION_FIELDS + MODEL_FIELDS + TOKENIZER_FIELDS),
                               st.integers(min_value=0, max_value=50)), max_size=2), value=WEIRD)
def test_mutated_model_settings_answer_or_fail_in_one_line(answering_model: tuple[Path, Path], name: str,
                                                           path: list[object], value: object) -> None:
    """An eighth of EXAMPLES: each loads the model and answers. Whatever its config.json,
    generation_config.json or tokenizer_config.json holds, evaluate answers (greedy, one answer a prompt, in bounded time
    and memory) or says in one line why not."""
    model, prompts = answering_model
    file = model / name
    pristine = file.read_text()
    file.write_text(json.dumps(_mutate_json(json.loads(pristine), path, value)))
    start = time.monotonic()
    try:
        result = CliRunner().invoke(main, ["evaluate", str(model), "--harmful", str(prompts), "--harmless", str(prompts),
                                           "--max-new-tokens", "2", "-q"])
    finally:
        file.write_text(pristine)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code:
        assert result.output.strip().splitlines()[-1].startswith("Error: "), result.output
    else:
        assert "refusals: " in result.output, result.output
    assert time.monotonic() - start < 60


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(path)
    return load_tokenizer(path)


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=None, suppress_health_check=NO_FIXTURE_CHECK)
@given(parts=st.lists(st.one_of(TEMPLATE_PARTS, st.text(max_size=6)), max_size=16),
       prompts=st.lists(st.text(max_size=20), min_size=1, max_size=3), system=st.none() | st.text(max_size=10))
def test_chat_templates_render_bounded_or_fail_in_one_line(chat_tokenizer: Any, parts: list[str], prompts: list[str],
                                                           system: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half of EXAMPLES: each forks a renderer (tens of ms)."""
    monkeypatch.setattr(chat, "SECONDS_PER_PROMPT", 0.5)
    chat_tokenizer.chat_template = "".join(parts) or "{{ messages }}"
    start = time.monotonic()
    try:
        texts = format_prompts(chat_tokenizer, prompts, True, system)
    except AbliterateError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("the model's chat template"), str(exc)
    else:
        assert len(texts) == len(prompts) and all(isinstance(t, str) for t in texts)
        own = len(system or "")
        assert all(len(t) <= own + len(p) + chat.ADDED_CHARS for t, p in zip(texts, prompts))
    assert time.monotonic() - start < 0.5 * len(prompts) + 5
