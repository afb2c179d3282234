"""The proof of an architecture map, on a tiny random model that transformers itself builds.

For a ``model_type``: a tiny config from transformers' config class, a random model from
its model class, saved sharded in each layout transformers writes (the Hub's, with
per-expert tensors where the Hub has them, and transformers' own fused one), rewritten
by the real pipeline with a random direction, loaded back by transformers and run:

- every tensor outside the plan keeps its bytes; every planned one is the in-memory edit;
- in every planned layer, each residual write (after its output norm, where the map
  declares one) and the layer's whole update have no component along ``r``; every
  writer, and every expert slice of a fused tensor, gets a gradient, so the tokens
  reached every expert; the same writes in the source model do have a component along
  ``r`` (the check has teeth);
- the logits equal those of a checkpoint edited in memory.

A map that names a wrong tensor, a wrong axis or a wrong norm fails one of these.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architecture import Architecture, ResidualWriter
from .directions import Measurements
from .edits import layer_prefix
from .errors import AbliterateError
from .io.checkpoint import Checkpoint
from .pipeline import RewriteJob, prepare
from .plan import Plan, PlanEntry
from .registry import Registry

LAYOUTS = ("hub", "fused")  # save_pretrained(save_original_format=True / False)
MEASUREMENT = 1  # the plan's measurement layer, for every target layer
TOLERANCE = 1e-4  # largest |x . r| / |x| allowed in an edited float32 model
TEETH = 1e-2  # smallest |x . r| / |x| expected at the same place in the source model
TOKENS = (4, 24)  # batch and length of each forward pass
TRIES = 4  # forward passes, with fresh tokens, until every expert was routed some

# Config keys -> tiny values, applied where transformers' config class has the key.
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "moe_shared_expert_intermediate_size": 48,
    "intermediate_size_mlp": 96, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "top_k_experts": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "ssm_state_size": 8, "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 2, "chunk_size": 8,
    "sliding_window": 16, "attention_chunk_size": 16, "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 8,
}
TINY_VISION: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "depth": 1, "num_attention_heads": 2,
    "num_heads": 2, "head_dim": 16, "vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 32,
}
TINY_TOP: dict[str, Any] = {"projection_hidden_size": 32}
TEXT_WIDTH_KEYS = ("out_hidden_size", "output_proj_dims")  # vision outputs that feed the text width


# -- the tiny model -----------------------------------------------------------------------------

def tiny_config(model_type: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """A tiny config of ``model_type`` from transformers' own config class; ``overrides`` go
    into the decoder's part (``text_config`` of a multimodal wrapper)."""
    import transformers
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise AbliterateError(f"transformers {transformers.__version__} has no model_type '{model_type}'; "
                              "a newer transformers may")
    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    subs = [k for k, v in defaults.items() if k.endswith("_config") and isinstance(v, dict) and "model_type" in v]
    text_key = "text_config" if "text_config" in subs else None
    text_defaults = defaults[text_key] if text_key else defaults
    text = _shrunk(text_defaults, TINY_TEXT)
    top = _shrunk(defaults, TINY_TOP) if text_key else text
    for sub in subs:
        if sub != text_key:
            top[sub] = {**_shrunk(defaults[sub], TINY_VISION),
                        **{k: text["hidden_size"] for k in TEXT_WIDTH_KEYS if k in defaults[sub]}}
    ids = iter(range(TINY_TEXT["vocab_size"] - 1, 0, -1))
    for target, source in ((top, defaults), (text, text_defaults)):
        _small_token_ids(target, source, ids)
    _consistent(text, text_defaults)
    text.update(overrides or {})
    if text_key:
        top[text_key] = text
    return cls(**top)


def _shrunk(defaults: Mapping[str, Any], table: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k in defaults}


def _small_token_ids(target: dict[str, Any], source: Mapping[str, Any], ids: Iterable[int]) -> None:
    """Special token ids inside the tiny vocabulary (an embedding's padding index must be)."""
    it = iter(ids)
    for key, value in source.items():
        if not key.endswith(("token_id", "token_index", "token_ids")):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value >= TINY_TEXT["vocab_size"]:
            target[key] = next(it)
        elif isinstance(value, list) and any(isinstance(v, int) and v >= TINY_TEXT["vocab_size"] for v in value):
            target[key] = [next(it) for _ in value]


def _consistent(text: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """Sizes that must agree with others: MLA's rotary head, multimodal rotary sections."""
    if "qk_rope_head_dim" in defaults and "head_dim" in defaults:
        text["head_dim"] = text["qk_rope_head_dim"]
    rope = defaults.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
        half = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) // 2
        sections = rope["mrope_section"]
        scaled = [s * half // sum(sections) for s in sections]
        scaled[0] += half - sum(scaled)
        text["rope_parameters"] = {**rope, "mrope_section": scaled}


def random_model(config: Any, seed: int = 0) -> torch.nn.Module:
    """transformers' own model for ``config``, float32, with random norm gains and biases
    (so that output norms and bias edits are exercised, not left at 1 and 0)."""
    import transformers as tf

    torch.manual_seed(seed)
    cls = tf.AutoModelForImageTextToText if "vision_config" in config.to_dict() else tf.AutoModelForCausalLM
    model = cls.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.02)
    return model.float().eval()


def save(model: torch.nn.Module, path: Path, layout: str) -> Path:
    """Sharded safetensors: ``hub`` as the Hub stores the model, ``fused`` as transformers holds it."""
    model.save_pretrained(path, max_shard_size="200KB", save_original_format=layout == "hub")
    return path


def load(path: Path) -> torch.nn.Module:
    import transformers as tf

    config = json.loads((path / "config.json").read_text())
    cls = tf.AutoModelForImageTextToText if "vision_config" in config else tf.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


# -- the proof ----------------------------------------------------------------------------------

@dataclass
class Proof:
    """What one layout's proof found; ``problems`` empty means the map is proven on it."""

    model_type: str
    layout: str
    architecture: str = "?"
    planned: list[int] = field(default_factory=list)
    edited: int = 0
    components: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)  # stacked writers, with their axis
    worst: float = 0.0  # largest |x . r| / |x| at any write or layer update of the edited model
    weakest: float = float("inf")  # smallest such value at the same places in the source model
    experts: int = 0  # expert slices that were routed and edited
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = "PROVEN" if not self.problems else f"FAILED ({len(self.problems)} problems)"
        out = [f"{self.model_type} [{self.layout}] -> {self.architecture}: {head}",
               f"  planned layers {self.planned}; {self.edited} tensors edited; components {', '.join(self.components)}",
               (f"  |r . write| / |write|: at most {self.worst:.1e} after (tolerance {TOLERANCE:.0e}), "
                f"at least {self.weakest:.1e} before; {self.experts} expert slices routed and edited")]
        out += [f"  fused: {f}" for f in self.fused]
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  problem: {p}" for p in self.problems]
        return out


def prove(model_type: str, workdir: Path, *, registry: Registry | None = None,
          overrides: Mapping[str, Any] | None = None, layouts: Iterable[str] = LAYOUTS,
          strategy: str = "norm-preserving") -> list[Proof]:
    """Prove the map that recognises ``model_type`` on each layout that transformers saves
    differently (one proof when both layouts have the same tensors)."""
    with _quiet():
        model = _tiny_model(model_type, overrides)
        proofs: list[Proof] = []
        seen: list[list[str]] = []
        for layout in layouts:
            if layout not in LAYOUTS:
                raise AbliterateError(f"unknown layout '{layout}'; known: {', '.join(LAYOUTS)}")
            src = save(model, workdir / layout, layout)
            names = sorted(Checkpoint.open(src).names)
            if names in seen:
                shutil.rmtree(src)
                proofs[-1].notes.append(f"the {layout} layout has the same tensors")
                continue
            seen.append(names)
            proofs.append(prove_checkpoint(model_type, layout, src, workdir, registry or Registry(), strategy))
        return proofs


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers without warnings and progress bars; torch on one thread, since with tiny
    matrices more threads only spin against each other (ten times slower on a busy machine)."""
    from transformers.utils import logging as tf_logging

    level, bars, threads = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled(), torch.get_num_threads()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()
        torch.set_num_threads(threads)


def _tiny_model(model_type: str, overrides: Mapping[str, Any] | None) -> torch.nn.Module:
    try:
        return random_model(tiny_config(model_type, overrides))
    except AbliterateError:
        raise
    except Exception as exc:  # noqa: BLE001 (transformers refuses the tiny config: say so, in one line)
        raise AbliterateError(f"transformers cannot build a tiny {model_type}: {type(exc).__name__}: {exc}; "
                              "adjust its config (--config KEY=VALUE)") from None


def prove_checkpoint(model_type: str, layout: str, src: Path, workdir: Path, registry: Registry,
                     strategy: str = "norm-preserving") -> Proof:
    """The proof on one saved checkpoint ``src`` of a tiny model (``layout`` names it in the
    report); its outputs go under ``workdir``."""
    proof = Proof(model_type, layout)
    out = workdir / f"{layout}-out"
    try:
        with _quiet():
            job = _rewrite(src, out, workdir / f"{layout}-directions.safetensors", registry, strategy, proof)
            proof.problems += _check_tensors(job, out)
            reference = _edit_in_memory(job, src, workdir / f"{layout}-in-memory")
            _check_models(job, load(src), load(out), load(reference), proof)
    except AbliterateError as exc:
        proof.problems.append(str(exc))
    except Exception as exc:  # noqa: BLE001 (transformers cannot load or run it: a failed proof, not a crash)
        proof.problems.append(f"transformers could not load or run the model: {type(exc).__name__}: {exc}; "
                              "adjust its config (--config KEY=VALUE)")
    return proof


def _rewrite(src: Path, out: Path, directions: Path, registry: Registry, strategy: str, proof: Proof) -> RewriteJob:
    """The real pipeline, with every layer planned but one like another (the control)."""
    ckpt = Checkpoint.open(src)
    arch = registry.architecture_for(ckpt.config, ckpt.names)
    n, width = arch.num_layers(ckpt.config), arch.hidden_size(ckpt.config)
    random_measurements(width, n).save(directions)
    control = _control_layer(arch, ckpt, n)
    proof.planned = [i for i in range(n) if i != control]
    if control is None:
        proof.notes.append("no two layers are alike, so all are planned: the unplanned-layer check has no layer")
    plan = Plan(tuple(PlanEntry(i, MEASUREMENT) for i in proof.planned))
    job = prepare(src, out, directions, plan, strategy, registry=registry)
    job.run(out, progress=False)
    proof.architecture = arch.name
    proof.edited = len(job.edits)
    proof.components = sorted({e.component for e in job.edits.values()})
    proof.fused = sorted({f"{_generic(e.name)} axis {e.axis} of {list(ckpt.entry(e.name).shape)}"
                          for e in job.edits.values() if e.stacked})
    return job


def _control_layer(arch: Architecture, ckpt: Checkpoint, n: int) -> int | None:
    """The last layer whose kinds of writers another layer also has, so that every kind is
    still planned somewhere; None when every layer is unique."""
    kinds = [frozenset((w.component, w.axis) for w in arch.residual_writers(i, ckpt.config, ckpt.names)
                       if w.name in ckpt.names) for i in range(n)]
    return next((i for i in reversed(range(n)) if kinds.count(kinds[i]) > 1), None)


def _generic(name: str) -> str:
    return ".".join("N" if part.isdigit() else part for part in name.split("."))


def random_measurements(width: int, layers: int, seed: int = 1) -> Measurements:
    """Random harmful and harmless means: a random, well-conditioned direction per layer."""
    g = torch.Generator().manual_seed(seed)
    harmless = {i: torch.randn(width, generator=g, dtype=torch.float64) for i in range(layers)}
    harmful = {i: harmless[i] + torch.randn(width, generator=g, dtype=torch.float64) for i in range(layers)}
    return Measurements(harmful, harmless, 10, 10, {"model": "tiny-random"})


def _check_tensors(job: RewriteJob, out: Path) -> list[str]:
    """Untouched tensors keep their bytes; edited ones changed, and equal the in-memory edit."""
    from safetensors.torch import load_file

    problems = []
    for shard in job.ckpt.shards:
        before, after = load_file(shard.path), load_file(out / shard.name)
        for name, tensor in before.items():
            edit = job.edits.get(name)
            if edit is None:
                if not _same_bytes(tensor, after[name]):
                    problems.append(f"{name}: not planned, yet changed")
                continue
            if not _same_bytes(edit.apply(tensor, job.compute)[0], after[name]):
                problems.append(f"{name}: differs from the same edit done in memory")
            if torch.equal(tensor, after[name]):
                problems.append(f"{name}: planned, yet unchanged")
    return problems


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _edit_in_memory(job: RewriteJob, src: Path, dst: Path) -> Path:
    """The source checkpoint with every planned tensor edited in memory, written by safetensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for shard in job.ckpt.shards:
        tensors = load_file(shard.path)
        if any(name in job.edits for name in tensors):
            with safe_open(str(shard.path), "pt") as f:
                metadata = f.metadata()
            edited = {n: job.edits[n].apply(t, job.compute)[0] if n in job.edits else t for n, t in tensors.items()}
            save_file(edited, dst / shard.name, metadata=metadata)
    return dst


# -- forward passes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Site:
    """A place whose output is added to the residual stream (a writer, or its last output
    norm) or, for ``layer``, a whole decoder layer, whose update is output minus input."""

    module: str
    label: str
    layer: int
    whole: bool = False


def _check_models(job: RewriteJob, source: torch.nn.Module, edited: torch.nn.Module, reference: torch.nn.Module,
                  proof: Proof) -> None:
    config, arch = job.ckpt.config, job.arch
    names = set(edited.state_dict())
    sites, writers = _sites(arch, config, names, proof)
    directions = {i: _direction(job, i) for i in proof.planned}
    tries, used = _routed_runs(edited, writers, sites, proof)
    proof.worst = max((_along(x, directions[s.layer]) for s, xs in tries.items() for x in xs), default=0.0)
    for site, xs in tries.items():
        worst = max(_along(x, directions[site.layer]) for x in xs)
        if worst > TOLERANCE:
            proof.problems.append(f"layer {site.layer}: {site.label} still writes along r "
                                  f"(|x . r| / |x| up to {worst:.2e})")
    before = _capture(source, sites, _tokens(0), proof)
    for site in sites:
        strength = max((_along(x, directions[site.layer]) for x in before.get(site, [])), default=0.0)
        proof.weakest = min(proof.weakest, strength)
        if strength < TEETH:
            proof.problems.append(f"layer {site.layer}: {site.label} writes nothing along r even before the edit "
                                  f"({strength:.2e}); the check would prove nothing there")
    _check_coverage(writers, used, proof)
    ids = _tokens(0)
    with torch.no_grad():
        if not torch.equal(_logits(edited, ids, proof), _logits(reference, ids, proof)):
            proof.problems.append("logits differ from those of the checkpoint edited in memory")


def _sites(arch: Architecture, config: Mapping[str, Any], names: set[str],
           proof: Proof) -> tuple[list[_Site], dict[int, list[ResidualWriter]]]:
    """Where each planned layer writes, found by the map in the model as transformers holds it."""
    sites: dict[str, _Site] = {}
    writers: dict[int, list[ResidualWriter]] = {}
    for layer in proof.planned:
        found = [w for w in arch.residual_writers(layer, config, names) if w.name in names]
        if not found:
            raise AbliterateError(f"layer {layer}: the map names no writer of the model as transformers holds it "
                                  f"(tensors such as {sorted(names)[:3]})")
        writers[layer] = found
        prefix = layer_prefix(arch, layer, config, names, found)
        sites[prefix] = _Site(prefix, "the layer's update", layer, whole=True)
        for w in found:
            norms = list(w.output_norm.chain()) if w.output_norm else []
            module = (norms[-1].name if norms else w.name).rsplit(".", 1)[0]
            label = f"{w.component} ({module})"
            sites.setdefault(module, _Site(module, label, layer))
    return list(sites.values()), writers


def _direction(job: RewriteJob, layer: int) -> torch.Tensor:
    r = job.strategy.refine(Measurements.load(job.record["directions"]), MEASUREMENT, layer)
    return (r / r.norm()).float()


def _along(x: torch.Tensor, r: torch.Tensor) -> float:
    """The largest |x_t . r| / |x_t| over the tokens t that write something at all."""
    rows = x.reshape(-1, x.shape[-1]).float()
    norms = rows.norm(dim=-1)
    keep = norms > 1e-6 * float(norms.max()) if rows.numel() else norms > 0
    if not keep.any():
        return 0.0
    return float(((rows[keep] @ r).abs() / norms[keep]).max())


def _routed_runs(model: torch.nn.Module, writers: Mapping[int, list[ResidualWriter]], sites: list[_Site],
                 proof: Proof) -> tuple[dict[_Site, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """Forward and backward passes with fresh tokens until every writer, and every expert of a
    fused one, has a gradient (was used); returns the writes seen and the slices used."""
    params = dict(model.named_parameters(remove_duplicate=False))
    targets = {w.name: params[w.name] for ws in writers.values() for w in ws if w.name in params}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in targets.values():
        p.requires_grad_(True)
    seen: dict[_Site, list[torch.Tensor]] = {s: [] for s in sites}
    used = {name: torch.zeros(p.shape[0] if p.dim() >= 3 else 1, dtype=torch.bool) for name, p in targets.items()}
    for attempt in range(TRIES):
        model.zero_grad(set_to_none=True)
        for site, xs in _capture(model, sites, _tokens(attempt), proof, backward=True).items():
            seen[site] += xs
        for name, p in targets.items():
            if p.grad is not None:
                g = p.grad.reshape(used[name].shape[0], -1) if p.dim() >= 3 else p.grad.reshape(1, -1)
                used[name] |= g.abs().amax(dim=1) > 0
        if all(u.all() for u in used.values()):
            break
    for p in targets.values():
        p.requires_grad_(False)
    return seen, used


def _check_coverage(writers: Mapping[int, list[ResidualWriter]], used: Mapping[str, torch.Tensor],
                    proof: Proof) -> None:
    for ws in writers.values():
        for w in ws:
            if w.name not in used:
                proof.problems.append(f"{w.name}: not a parameter of the loaded model")
                continue
            hit = used[w.name]
            if hit.numel() > 1:
                proof.experts += int(hit.sum())
            if not hit.all():
                missing = [i for i in range(hit.numel()) if not hit[i]]
                what = f"experts {missing}" if hit.numel() > 1 else "it"
                proof.problems.append(f"{w.name}: {what} never used in {TRIES} forward passes; the check proves "
                                      "nothing about them")


def _capture(model: torch.nn.Module, sites: list[_Site], ids: torch.Tensor, proof: Proof,
             backward: bool = False) -> dict[_Site, list[torch.Tensor]]:
    """One forward pass (and a backward one), recording what each site writes."""
    seen: dict[_Site, list[torch.Tensor]] = {s: [] for s in sites}
    inputs: dict[_Site, torch.Tensor] = {}
    handles = []
    for site in sites:
        module = model.get_submodule(site.module)
        if site.whole:
            handles.append(module.register_forward_pre_hook(_remember_input(site, inputs), with_kwargs=True))
        handles.append(module.register_forward_hook(_remember_output(site, inputs, seen)))
    try:
        with torch.enable_grad() if backward else torch.no_grad():
            logits = _logits(model, ids, proof)
            if backward:
                weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
                (logits * weights).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return seen


def _remember_input(site: _Site, inputs: dict[_Site, torch.Tensor]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs[site] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
    return hook


def _remember_output(site: _Site, inputs: dict[_Site, torch.Tensor],
                     seen: dict[_Site, list[torch.Tensor]]) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        out = (output[0] if isinstance(output, tuple) else output).detach().clone()
        seen[site].append(out - inputs.pop(site) if site.whole else out)
    return hook


def _tokens(seed: int) -> torch.Tensor:
    """Random ordinary tokens (below the tiny vocabulary's special ids)."""
    return torch.randint(4, 100, TOKENS, generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor, proof: Proof) -> torch.Tensor:
    """The model's logits; through its language model where the wrapper's text-only forward fails.
    Without a cache: one pass needs none, and building one can fail where the forward would not
    (transformers 5.25's nemotron_h asks a layer without attention for its cached length)."""
    try:
        return model(input_ids=ids, use_cache=False).logits
    except (AttributeError, TypeError) as exc:
        language = getattr(model, "language_model", None)
        if language is None:
            raise
        note = f"forward through .language_model: the wrapper's text-only forward fails ({exc})"
        if note not in proof.notes:
            proof.notes.append(note)
        return language(input_ids=ids, use_cache=False).logits
