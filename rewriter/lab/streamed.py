"""Layer-streamed forward passes: measure and evaluate a model bigger than RAM, with one decoder
layer's weights in memory at a time.

transformers builds the model on the meta device (no weights). A first pass of the model's own
forward per batch, with its decoder layers standing in as recorders, gives the embedding output
and what each layer is called with (masks, position embeddings: whatever the architecture
computes); only the embedding rows the prompts use are read. Then each layer is filled from the
shards, run over every batch and emptied again, while the residual stream of every prompt stays
in memory. For logits, the model's own forward runs once more per batch with the final residual
standing in for the last layer's output, and only the final norm and the head filled. The
batches are the in-memory path's, so the numbers are the same.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from ..dtypes import DTYPES, FLOAT_DTYPES, RUN_DTYPES, dtype_name
from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint
from ..io.hub import open_hub_checkpoint, parse_spec
from .memory import MemoryChoice, choose, human, peak_rss_bytes, rss_bytes
from .models import (LoadedModel, batches, built, format_prompts, forward_batch, load_config, load_tokenizer,
                     model_class, resolve_model)
from ..logical import LogicalTensors
from .weights import WeightReader, filled, slots

if TYPE_CHECKING:
    from ..registry import Registry

Call = tuple[tuple[Any, ...], dict[str, Any]]  # a decoder layer's arguments besides the hidden states
Batch = tuple[int, list[int], Any]  # (prompt set, prompt indices, encoded batch)


class _Recorded(Exception):
    """Raised by the last layer's stand-in: nothing after it is needed while recording."""


@dataclass
class StreamedModel:
    """A model built on the meta device, with the checkpoint its weights are read from."""

    model: Any
    tokenizer: Any
    path: str
    ckpt: Checkpoint
    view: LogicalTensors  # the tensors by the model's names (a quantized weight decoded by its codec)
    layers_prefix: str  # checkpoint names of decoder layer i start with f"{layers_prefix}.{i}."
    tied: bool  # the head is the input embedding

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def lm(self) -> LoadedModel:
        """For prompt formatting and batching, which only need the tokenizer."""
        return LoadedModel(self.model, self.tokenizer, self.path)

    @cached_property
    def _qualified(self) -> dict[int, str]:
        return {id(m): name for name, m in self.model.named_modules()}

    def _within_decoder(self, module: nn.Module) -> str | None:
        """The module's name inside the decoder ('layers.3', 'norm'), or None outside it."""
        top, name = self._qualified[id(self.decoder)], self._qualified[id(module)]
        if not top:
            return name
        return name[len(top) + 1:] if name.startswith(top + ".") else None

    @cached_property
    def _checkpoint_base(self) -> str:
        """What the checkpoint puts before the decoder's own names ('model.', 'language_model.model.')."""
        layers = self._within_decoder(self.layers) or ""
        if not self.layers_prefix.endswith(layers):
            raise AbliterateError(f"{self.path}: decoder layers are '{self.layers_prefix}' in the checkpoint, "
                                  f"'{layers}' in transformers' model; cannot match them")
        return self.layers_prefix[: len(self.layers_prefix) - len(layers)]

    def names(self, module: nn.Module) -> dict[str, str]:
        """Checkpoint name of each tensor of ``module`` (part of the decoder, or the head)."""
        inner = self._within_decoder(module)
        if inner is not None:
            base = self._checkpoint_base + (inner + "." if inner else "")
            return {n: base + n for n, *_ in slots(module)}
        top = self._qualified[id(module)]
        parts = self._checkpoint_base.rstrip(".").split(".")
        for k in range(len(parts), -1, -1):  # the head sits beside the decoder, at some level above it
            base = ".".join([*parts[:k], top]) + "."
            found = {n: base + n for n, *_ in slots(module)}
            if all(v in self.view.names for v in found.values()):
                return found
        if self.tied:
            return {"weight": self.names(self.model.get_input_embeddings())["weight"]}
        raise AbliterateError(f"{self.path}: no weights for '{top}' in the checkpoint")


def _layers_prefix(ckpt: Checkpoint, view: LogicalTensors, registry: Registry | None) -> str:
    """Where the architecture map finds decoder layers: 'model.layers', 'language_model.model.layers', ..."""
    from ..edits import layer_prefix
    from ..registry import Registry

    arch = (registry or Registry()).architecture_for(ckpt.config, view.names)
    writers = arch.residual_writers(0, ckpt.config, view.names)
    return layer_prefix(arch, 0, ckpt.config, view.names, writers).removesuffix(".0")


def _real_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies, embedding scales) computed on the CPU, as from_pretrained does."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type == "meta" and name in module._non_persistent_buffers_set:
                module._buffers[name] = torch.empty_like(buf, device="cpu")
    model.initialize_weights()  # fills those buffers; parameters stay on the meta device


def logical_view(ckpt: Checkpoint, registry: Registry | None = None) -> LogicalTensors:
    """The checkpoint's tensors as the model names them; a quantized one's through the codec plugin
    that reads it (``registry``: the plugins, -p ones included; the installed ones by default)."""
    from ..registry import Registry

    return LogicalTensors.of(ckpt, registry or Registry())


def _float_config(config: Any) -> Any:
    """The config without ``quantization_config`` (top level or text sub-config): the model is built
    in float and filled with decoded weights, never quantized by transformers."""
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if hasattr(c, "quantization_config"):
            del c.quantization_config
    return config


def open_streamed(name: str | Path, dtype: str = "float32", registry: Registry | None = None,
                  ckpt: Checkpoint | None = None) -> StreamedModel:
    """A checkpoint's model built without weights, ready to be run layer by layer (``ckpt``: one
    already opened, a Hub one read by byte range)."""
    path = ckpt.root if ckpt is not None else resolve_model(name)
    ckpt = ckpt or Checkpoint.open(path)
    view = logical_view(ckpt, registry)
    config = _float_config(load_config(path, len(ckpt.names)))
    cls = model_class(config, path)
    with torch.device("meta"):
        model = built(lambda: cls.from_config(config, dtype=DTYPES[dtype_name(dtype, RUN_DTYPES)]), path).eval()
    _real_buffers(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return StreamedModel(model, load_tokenizer(path), str(path), ckpt, view, _layers_prefix(ckpt, view, registry), tied)


def run_dtype_bytes(ckpt: Checkpoint, view: LogicalTensors, dtype: str, prefix: str = "") -> int:
    """Bytes of the weights under ``prefix`` in the run dtype: float tensors cast, quantized ones decoded
    (what memory holds, not what the disk does)."""
    size = DTYPES[dtype_name(dtype, RUN_DTYPES)].itemsize
    return sum(math.prod(view.shape(ckpt, n)) * size for n in view.names
               if n.startswith(prefix) and (n in view.packed or ckpt.entry(n).dtype in FLOAT_DTYPES))


def streamed_if_needed(name: str | Path, dtype: str, max_memory: int | None, device: str = "cpu",
                       log: Callable[[str], None] = lambda s: None, logits: bool = False,
                       registry: Registry | None = None, low_disk: bool = False) -> StreamedModel | None:
    """The streamed model when the whole one does not fit (or --max-memory says so), else None.
    With ``low_disk``, a Hub model is always streamed, its weights read by byte range (never on disk).

    With ``max_memory``, the largest piece held at once (a decoder layer) must fit beside what
    this process already holds.
    """
    if device != "cpu" and max_memory is None and not low_disk:
        return None
    hub = parse_spec(str(name)) if low_disk else None
    remote = open_hub_checkpoint(*hub) if hub else None  # config and tokenizer downloaded, no shard
    path = remote.root if remote else resolve_model(name)
    config = load_config(path)
    model_class(config, path)  # not a language model: say so first
    fit = _fit(path, dtype, max_memory, registry, remote)
    if fit is None:
        return None
    ckpt, view, choice = fit
    log(f"{hub[0]}: --low-disk: its weights are read from the Hub layer by layer, never stored" if hub
        else f"{path.name}: {choice.reason}")
    if not (choice.stream or hub):
        return None
    if device != "cpu":
        raise AbliterateError(f"the streamed forward runs on the CPU; --device {device} needs the whole model in memory")
    sm = open_streamed(path, dtype, registry, ckpt)
    largest = max(run_dtype_bytes(ckpt, view, dtype, f"{sm.layers_prefix}.{i}.") for i in range(len(sm.layers)))
    log(f"streaming holds one decoder layer at a time (the largest: {human(largest)} in {dtype})"
        + (f" and the output head in pieces of {human(HEAD_PIECE)}" if logits else ""))
    if max_memory is not None and rss_bytes() + largest > max_memory:
        raise AbliterateError(f"--max-memory {human(max_memory)} is too small to stream: this process holds "
                              f"{human(rss_bytes())} and the largest decoder layer is {human(largest)} in {dtype}")
    return sm


def _fit(path: Path, dtype: str, max_memory: int | None, registry: Registry | None,
         ckpt: Checkpoint | None = None) -> tuple[Checkpoint, LogicalTensors, MemoryChoice] | None:
    """The checkpoint (``ckpt``, or the one at ``path``), its tensors and whether its weights in
    ``dtype`` fit; None where it is no safetensors checkpoint the lab reads (a .bin one, say:
    transformers may still load it whole)."""
    try:
        opened = ckpt or Checkpoint.open(path)
        view = logical_view(opened, registry)
    except AbliterateError:
        if max_memory is None and ckpt is None:
            return None
        raise
    return opened, view, memory_choice(opened, view, dtype, max_memory)


def memory_choice(ckpt: Checkpoint, view: LogicalTensors, dtype: str, max_memory: int | None) -> MemoryChoice:
    """Whether the model's weights, decoded into ``dtype``, fit in ``max_memory`` (default: the
    memory available): what decides between loading it whole and streaming it."""
    return choose(run_dtype_bytes(ckpt, view, dtype), max_memory)


def require_whole(name: str | Path, dtype: str, what: str, registry: Registry | None = None) -> None:
    """A one-line error, before anything loads, where work that needs the whole model in memory
    (a search edits it in place) meets a model that does not fit."""
    path = resolve_model(name)
    fit = _fit(path, dtype, None, registry)
    if fit is not None and fit[2].stream:
        raise AbliterateError(f"{what} needs the whole model in memory and {path.name} does not fit "
                              f"({fit[2].reason.split(':')[0]}); use the heuristic plan instead: abliterate analyze "
                              "DIRECTIONS --suggest-plan plan.yml, then rewrite --plan plan.yml")


@contextmanager
def _standing_in(pairs: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Each module's forward replaced by a function for the duration of the block."""
    for module, fn in pairs:
        module.forward = fn
    try:
        yield
    finally:
        for module, _ in pairs:
            vars(module).pop("forward", None)


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Call]:
    """A decoder layer's hidden states and the rest of its arguments."""
    if args:
        return args[0], (args[1:], kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), ((), rest)


def _pass_through(*args: Any, **kwargs: Any) -> torch.Tensor:
    return _split(args, kwargs)[0]


@contextmanager
def _embedding_rows(sm: StreamedModel, batches_: Sequence[Batch], reader: WeightReader) -> Iterator[None]:
    """The input embedding with only the rows the prompts use, read from the checkpoint and indexed
    through a map from token id to row: the full table is never in memory."""
    embed = sm.model.get_input_embeddings()
    if not isinstance(embed, nn.Embedding):
        with filled(embed, sm.names(embed), reader):
            yield
        return
    ids = torch.unique(torch.cat([enc["input_ids"].flatten() for _, _, enc in batches_]))
    rows = reader.read_rows(sm.names(embed)["weight"], ids, embed.weight.dtype)
    where = torch.full((embed.num_embeddings,), -1, dtype=torch.long)
    where[ids] = torch.arange(len(ids))
    meta, padding = embed.weight, embed.padding_idx

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        index = where[input_ids]
        if bool((index < 0).any()):
            raise AbliterateError("the model looked up a token the prompts do not hold (image tokens are not streamed)")
        return type(embed).forward(embed, index)

    embed._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
    embed.padding_idx = None  # only steers gradients; its id may be past the rows kept
    try:
        with _standing_in([(embed, forward)]):
            yield
    finally:
        embed._parameters["weight"], embed.padding_idx = meta, padding


def outside_layers(sm: StreamedModel) -> list[nn.Module]:
    """The decoder's modules besides its layers and input embedding (the final norm, ...)."""
    skip = {id(sm.layers), id(sm.model.get_input_embeddings())}
    return [m for m in sm.decoder.children() if id(m) not in skip]


def _record(sm: StreamedModel, batches_: Sequence[Batch], reader: WeightReader) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """The embedding output of every batch, and every decoder layer's arguments for every batch."""
    layers = sm.layers
    calls: list[list[Call]] = [[] for _ in layers]
    states: list[torch.Tensor] = []

    def recorder(i: int) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden, call = _split(args, kwargs)
            calls[i].append(call)
            if i == 0:
                states.append(hidden)
            if i == len(layers) - 1:
                raise _Recorded
            return hidden
        return forward

    with ExitStack() as stack:
        stack.enter_context(_standing_in([(layer, recorder(i)) for i, layer in enumerate(layers)]))
        stack.enter_context(_embedding_rows(sm, batches_, reader))
        for m in outside_layers(sm):
            stack.enter_context(filled(m, sm.names(m), reader))
        for b, (_, _, enc) in enumerate(batches_):
            try:
                forward_batch(sm.model, enc, "cpu")
            except _Recorded:
                pass
            if len(states) != b + 1 or any(len(c) != b + 1 for c in calls):
                raise AbliterateError(f"{sm.path}: the model's forward does not call each decoder layer once; "
                                      "it cannot be streamed")
    return states, calls


def _logits(sm: StreamedModel, batches_: Sequence[Batch], states: list[torch.Tensor],
            reader: WeightReader) -> list[torch.Tensor]:
    """Logits at the last position of each batch, by the model's own forward with the final residual
    standing in for the last layer's output (so the final norm, and any logit scaling or soft-capping
    after the head, are the model's). The head itself is applied to every prompt at once, its rows read
    in pieces of ``HEAD_PIECE`` bytes: it is never whole in memory."""
    layers, current = sm.layers, {}
    head = sm.model.get_output_embeddings()
    names = sm.names(head)
    if not isinstance(head, nn.Linear) or not set(names) <= {"weight", "bias"}:
        raise AbliterateError(f"{sm.path}: the output head is not a linear layer; it cannot be streamed")
    normed: list[torch.Tensor] = []

    def head_input(h: torch.Tensor) -> torch.Tensor:
        normed.append(h[:, -1, :])
        return h.new_zeros(*h.shape[:-1], head.out_features)

    def head_output(h: torch.Tensor) -> torch.Tensor:
        return current["logits"].unsqueeze(1).expand(*h.shape[:-1], -1)

    stand_ins = [(sm.model.get_input_embeddings(), lambda ids: torch.zeros_like(current["h"])),
                 *((layer, _pass_through) for layer in layers[:-1]), (layers[-1], lambda *a, **k: current["h"])]

    def run(b: int) -> torch.Tensor:
        current["h"] = states[b]
        return forward_batch(sm.model, batches_[b][2], "cpu").logits[:, -1, :].float()

    with ExitStack() as stack:
        stack.enter_context(_standing_in(stand_ins))
        for m in outside_layers(sm):
            stack.enter_context(filled(m, sm.names(m), reader))
        with _standing_in([(head, head_input)]):
            for b in range(len(batches_)):
                run(b)
        logits = _apply_head(torch.cat(normed), names, reader, head.weight.dtype)
        starts = [0, *itertools.accumulate(len(n) for n in normed)]
        out = []
        with _standing_in([(head, head_output)]):
            for b in range(len(batches_)):
                current["logits"] = logits[starts[b] : starts[b + 1]]
                out.append(run(b))
    return out


HEAD_PIECE = 64 * 10**6  # bytes of the output head in memory at once


def _apply_head(hidden: torch.Tensor, names: Mapping[str, str], reader: WeightReader, dtype: torch.dtype) -> torch.Tensor:
    """``hidden`` [prompts, width] times the head, whose rows are read ``HEAD_PIECE`` bytes at a time."""
    bias = reader.read(names["bias"], dtype) if "bias" in names else None
    rows = reader.shape(names["weight"])[0]
    logits = torch.empty(len(hidden), rows, dtype=hidden.dtype)
    for first, piece in reader.row_chunks(names["weight"], dtype, HEAD_PIECE):
        logits[:, first : first + len(piece)] = nn.functional.linear(
            hidden, piece, None if bias is None else bias[first : first + len(piece)])
    return logits


@dataclass
class StreamStats:
    """What the weights cost: bytes read, seconds reading, seconds in all, per layer too."""

    bytes_read: int = 0
    read_seconds: float = 0.0
    seconds: float = 0.0
    activations: int = 0  # bytes of the residual stream of every prompt, held through the pass
    layers: list[tuple[float, float, int]] = field(default_factory=list)  # (read s, total s, bytes) per layer

    def line(self) -> str:
        rate = self.bytes_read / self.read_seconds if self.read_seconds else 0.0
        return (f"streamed {len(self.layers)} layers: read {human(self.bytes_read)} of weights in {self.read_seconds:.1f} s "
                f"({human(rate)}/s), {self.seconds:.1f} s in all; activations {human(self.activations)}; "
                f"peak RSS {human(peak_rss_bytes())}")


def forward_streamed(sm: StreamedModel, batches_: Sequence[Batch], *,
                     on_states: Callable[[int, list[torch.Tensor]], None] | None = None,
                     logits: Collection[int] = (), progress: bool = True,
                     stats: StreamStats | None = None) -> dict[int, torch.Tensor]:
    """One pass over the weights for all batches: ``on_states(N, [batch, width] per batch)`` gets
    hidden_states[N] at the last prompt token for N = 0..L-1; the last position's logits of the
    batches numbered in ``logits`` are returned by number (the head costs a pass over the
    vocabulary: only for the batches that need it)."""
    stats = stats if stats is not None else StreamStats()
    reader, start = WeightReader(sm.ckpt, sm.view), time.monotonic()
    try:
        with torch.inference_mode():
            states, calls = _record(sm, batches_, reader)
            stats.activations = sum(h.numel() * h.element_size() for h in states)
            layers = sm.layers
            with tqdm(total=len(layers), unit="layer", desc="layers", disable=not progress) as bar:
                for i, layer in enumerate(layers):
                    if on_states is not None:
                        on_states(i, [h[:, -1, :] for h in states])
                    t0, r0, b0 = time.monotonic(), reader.seconds, reader.bytes_read
                    with filled(layer, sm.names(layer), reader):
                        if i + 1 < len(layers):
                            reader.prefetch(list(sm.names(layers[i + 1]).values()))
                        for b, (args, kwargs) in enumerate(calls[i]):
                            out = layer(states[b], *args, **kwargs)
                            states[b] = out[0] if isinstance(out, tuple) else out
                    stats.layers.append((reader.seconds - r0, time.monotonic() - t0, reader.bytes_read - b0))
                    bar.set_postfix_str(f"{human(reader.bytes_read / max(reader.seconds, 1e-9))}/s read", refresh=False)
                    bar.update()
            wanted = sorted(logits)
            found = _logits(sm, [batches_[b] for b in wanted], [states[b] for b in wanted], reader) if wanted else []
            result = dict(zip(wanted, found))
    finally:
        reader.close()
    stats.bytes_read, stats.read_seconds = reader.bytes_read, reader.seconds
    stats.seconds = time.monotonic() - start
    return result


def encode_sets(sm: StreamedModel, sets: Sequence[Sequence[str]], *, batch_size: int, chat_template: bool,
                system_prompt: str | None) -> list[Batch]:
    """Every set's batches, exactly as the in-memory path makes them, one after the other."""
    out: list[Batch] = []
    for s, prompts in enumerate(sets):
        texts = format_prompts(sm.tokenizer, prompts, chat_template, system_prompt)
        out.extend((s, idx, enc) for idx, enc in batches(sm.lm, texts, batch_size, chat_template))
    return out


def streamed_means(sm: StreamedModel, sets: Sequence[Sequence[str]], *, batch_size: int, q: float, chat_template: bool,
                   system_prompt: str | None, progress: bool = True, log: Callable[[str], None] = lambda s: None,
                   stats: StreamStats | None = None,
                   openers: Sequence[int] | None = None) -> list[tuple[torch.Tensor, int]]:
    """Per set, the float64 [layers, width] mean of winsorized last-token residuals and the number of
    prompts in it (measure's numbers: same batches, same order of sums), all sets in one pass over
    the weights. With ``openers``, the first set's mean is over the prompts whose first response
    token opens a refusal more likely than not (measure --refused-only): their vectors are kept
    (prompts x layers x width float32) until the pass ends with the logits that say which."""
    from .measure import winsorize

    batches_ = encode_sets(sm, sets, batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt)
    width = sm.model.config.get_text_config().hidden_size
    sums = [torch.zeros(len(sm.layers), width, dtype=torch.float64) for _ in sets]
    counts = [len(prompts) for prompts in sets]
    kept: dict[int, list[torch.Tensor]] = {b: [] for b, (s, _, _) in enumerate(batches_) if s == 0 and openers}

    def on_states(n: int, vectors: list[torch.Tensor]) -> None:
        for b, ((s, _, _), v) in enumerate(zip(batches_, vectors)):
            clipped = winsorize(v.float(), q)
            if b in kept:
                kept[b].append(clipped)
            else:
                sums[s][n] += clipped.double().sum(0)

    stats = stats if stats is not None else StreamStats()
    logits = forward_streamed(sm, batches_, on_states=on_states, progress=progress, stats=stats, logits=kept)
    log(stats.line())
    if kept:
        from .refusals import refusal_log_odds

        assert openers is not None
        counts[0] = 0
        for b, vectors in kept.items():
            refused = torch.stack(vectors, 1)[refusal_log_odds(logits[b], openers) > 0]  # [refused, layers, width]
            sums[0] += refused.double().sum(0)
            counts[0] += len(refused)
    return [(total / max(count, 1), count) for total, count in zip(sums, counts)]


def streamed_first_token_logits(sm: StreamedModel, sets: Sequence[Sequence[str]], *, batch_size: int,
                                chat_template: bool = True, system_prompt: str | None = None, progress: bool = True,
                                log: Callable[[str], None] = lambda s: None) -> list[torch.Tensor]:
    """Per set, [prompts, vocab] float32 logits at the first response position, in the order given
    (evaluate's first_token_logits), all sets in one pass over the weights."""
    batches_ = encode_sets(sm, sets, batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt)
    stats = StreamStats()
    logits = forward_streamed(sm, batches_, logits=range(len(batches_)), progress=progress, stats=stats)
    log(stats.line())
    out = [torch.empty(len(prompts), logits[0].shape[-1]) for prompts in sets]
    for b, (s, idx, _) in enumerate(batches_):
        out[s][idx] = logits[b]
    return out
