"""Issue #15 experiments: can a change to how the refusal direction is measured or applied
bring Qwen2.5-Coder-0.5B-Instruct to <= 2/64 held-out refusals at first-token KL <= 0.05?

Everything is chosen on the MEASUREMENT halves (harmful-measure / harmless-measure, 64 each);
the eval halves are touched only by ``final`` for a few named finalists.

    python benchmarks/refusal_experiments.py screen [GROUP ...] [--out /tmp/r15]  # cheap scores -> OUT/screen.jsonl
    python benchmarks/refusal_experiments.py final NAME [NAME ...] [--out /tmp/r15]  # writes OUT/ckpt-NAME
    OMP_NUM_THREADS=1 abliterate evaluate OUT/ckpt-NAME --original qwen2.5-coder-0.5b-instruct \
        --markers project --save OUT/final-NAME.jsonl --json   # held-out check; the jsonl has both sets' hits

NAME: heuristic, conditioned (scale 1.0), conditioned-x0.9, conditioned-x1.1. "conditioned" is the
refusal-conditioned direction: the harmful mean is taken only over the harmful-measure prompts
the ORIGINAL model opens with a refusal more likely than not (first-token refusal log-odds > 0;
30 of 64), against all 64 harmless-measure prompts; the plan is what the project's
`analyze --suggest-plan` rule gives on those means (layers 6-23, measurement 22), biprojected.

Cheap scores (one forward pass, no generation): mean first-token refusal log-odds on the
64 harmful-measure prompts, and mean first-token KL(original || edited) on the 64
harmless-measure prompts. A variant is a per-layer set of directions removed from the
layer's residual writers (o_proj, down_proj) with W' = W - U U^T W (U orthonormal columns;
rank 1 reproduces the project's subtractive update), computed in float32/float64 from the
stored bf16 weights and rounded back to bf16, as the rewrite does.

Positions: the last K = 5 prompt tokens are the chat template after the user's text
(``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``); position -1 is the
project's measurement position.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rewriter.lab.evaluate import generate, kl_divergence
from rewriter.lab.example_models import example_model
from rewriter.lab.measure import winsorize
from rewriter.lab.models import LoadedModel, batches, format_prompts, load_model
from rewriter.lab.prompts import default_prompts
from rewriter.lab.markers import MARKER_SETS, markers_in
from rewriter.lab.refusals import opener_ids, refusal_log_odds

MODEL = "qwen2.5-coder-0.5b-instruct"
K = 5  # template tokens after the user's text
Q = 0.995  # winsorize quantile, the project's default
BATCH = 16


def log(*a: Any) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------- model, states, edits

class Lab:
    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.lm: LoadedModel = load_model(example_model(MODEL), "float32")
        self.openers = opener_ids(self.lm.tokenizer)
        self.layers = self.lm.model.model.layers
        self.L = len(self.layers)
        self.writers: dict[int, list[torch.nn.Parameter]] = {
            i: [l.self_attn.o_proj.weight, l.mlp.down_proj.weight] for i, l in enumerate(self.layers)}
        assert all(l.self_attn.o_proj.bias is None for l in self.layers)
        self.saved = {i: [p.detach().clone() for p in ps] for i, ps in self.writers.items()}
        self.edited: set[int] = set()

    def states(self, prompts: list[str], k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
        """([n, L, k, W] winsorized residuals at the last k prompt tokens, hidden_states[0..L-1];
        [n, vocab] first-response logits)."""
        texts = format_prompts(self.lm.tokenizer, prompts, True, None)
        out_s = torch.empty(len(texts), self.L, k, self.lm.model.config.hidden_size)
        out_l = torch.empty(len(texts), self.lm.model.config.vocab_size)
        for idx, enc in batches(self.lm, texts, BATCH, True):
            assert int(enc["attention_mask"].sum(-1).min()) > k
            out = self.lm.forward(enc, output_hidden_states=True)
            hs = torch.stack([h[:, -k:, :] for h in out.hidden_states[:-1]], dim=1).float()
            out_s[idx] = winsorize(hs, Q)
            out_l[idx] = out.logits[:, -1, :].float()
        return out_s, out_l

    def logits(self, prompts: list[str]) -> torch.Tensor:
        texts = format_prompts(self.lm.tokenizer, prompts, True, None)
        out = torch.empty(len(texts), self.lm.model.config.vocab_size)
        for idx, enc in batches(self.lm, texts, BATCH, True):
            out[idx] = self.lm.forward(enc).logits[:, -1, :].float()
        return out

    def apply(self, edit: dict[int, torch.Tensor], scale: float | dict[int, float] = 1.0) -> None:
        """edit: layer -> [W, r] directions (any; orthonormalised here) removed from both writers."""
        self.restore()
        with torch.no_grad():
            for layer, dirs in edit.items():
                s = scale[layer] if isinstance(scale, dict) else scale
                if s == 0:
                    continue
                u = orthonormal(dirs).float()
                for p, w0 in zip(self.writers[layer], self.saved[layer]):
                    w = w0.to(torch.bfloat16).float()
                    w = w - s * (u @ (u.T @ w))
                    p.copy_(w.to(torch.bfloat16).float())
                self.edited.add(layer)

    def restore(self) -> None:
        with torch.no_grad():
            for layer in self.edited:
                for p, w0 in zip(self.writers[layer], self.saved[layer]):
                    p.copy_(w0)
        self.edited = set()


def orthonormal(dirs: torch.Tensor) -> torch.Tensor:
    """[W, r] -> [W, r] orthonormal columns spanning dirs (two-pass Gram-Schmidt in float64)."""
    d = dirs.double()
    if d.dim() == 1:
        d = d[:, None]
    cols: list[torch.Tensor] = []
    for j in range(d.shape[1]):
        v = d[:, j].clone()
        for _ in range(2):
            for c in cols:
                v = v - (v @ c) * c
        n = v.norm()
        if n > 1e-8 * d[:, j].norm():
            cols.append(v / n)
    return torch.stack(cols, dim=1)


def remove(r: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        r = r - (r @ unit) * unit
    return r


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


# ---------------------------------------------------------------- scoring

class Screen:
    """Cheap scores on the measurement halves (64 + 64), the original's logits cached."""

    def __init__(self, lab: Lab, out: Path) -> None:
        self.lab, self.out = lab, out
        self.harmful = default_prompts("harmful-measure")
        self.harmless = default_prompts("harmless-measure")
        cache = out / "measure_states.pt"
        if cache.is_file():
            d = torch.load(cache)
        else:
            t = time.monotonic()
            bs, bl = lab.states(self.harmful)
            gs, gl = lab.states(self.harmless)
            d = {"bad": bs, "good": gs, "bad_logits": bl, "good_logits": gl}
            torch.save(d, cache)
            log(f"states of the original on the measurement halves: {time.monotonic() - t:.0f} s")
        self.bad, self.good = d["bad"].double(), d["good"].double()  # [64, L, K, W]
        self.ref_good = d["good_logits"]
        self.orig_odds = refusal_log_odds(d["bad_logits"], lab.openers)
        self.rows: list[dict[str, Any]] = []

    def score(self, name: str, edit: dict[int, torch.Tensor], scale: float | dict[int, float] = 1.0,
              note: str = "", harmful_idx: list[int] | None = None,
              harmless_idx: list[int] | None = None) -> dict[str, Any]:
        t = time.monotonic()
        self.lab.apply(edit, scale)
        try:
            harmful = self.harmful if harmful_idx is None else [self.harmful[i] for i in harmful_idx]
            gi = list(range(len(self.harmless))) if harmless_idx is None else harmless_idx
            bad_logits = self.lab.logits(harmful)
            odds = refusal_log_odds(bad_logits, self.lab.openers)
            greedy = int(torch.isin(bad_logits.argmax(-1), torch.tensor(self.lab.openers)).sum())
            kl = kl_divergence(self.ref_good[gi], self.lab.logits([self.harmless[i] for i in gi]))
        finally:
            self.lab.restore()
        top8 = float(odds.sort().values[-8:].mean())
        row = {"name": name, "odds": float(odds.mean()), "top8": top8, "greedy_opener": greedy,
               "refusing": int((odds > 0).sum()),
               "kl": float(kl.mean()), "kl32": float(kl[:32].mean()), "note": note,
               "s": round(time.monotonic() - t, 1), "per_prompt": [round(float(x), 3) for x in odds]}
        self.rows.append(row)
        log(f"{name:48s} odds {row['odds']:+7.3f}  top8 {top8:+6.3f}  greedy-opener {greedy:2d}/{len(harmful)}  "
            f"KL64 {row['kl']:.4f}  KL32 {row['kl32']:.4f}  {note}")
        with open(self.out / "screen.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


# ---------------------------------------------------------------- directions

def means(bad: torch.Tensor, good: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, W] harmful and harmless means over prompts and the given positions (-1 = last)."""
    p = [K + i if i < 0 else i for i in positions]
    return bad[:, :, p, :].mean(dim=(0, 2)), good[:, :, p, :].mean(dim=(0, 2))


def biprojected(hm: torch.Tensor, gm: torch.Tensor, m: int, t: int, gm_target: torch.Tensor | None = None) -> torch.Tensor:
    """The project's biprojected direction of measurement m for target t (means [L, W])."""
    r = remove(hm[m] - gm[m], unit(gm[m]))
    g = gm if gm_target is None else gm_target
    return unit(remove(r, unit(g[t])))


def plan_edit(hm: torch.Tensor, gm: torch.Tensor, layers: range, m: int | Callable[[int], int],
              gm_target: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    return {t: biprojected(hm, gm, m(t) if callable(m) else m, t, gm_target) for t in layers}


HEUR = range(6, 24)  # the heuristic plan: layers 6-23, measurement 22


# ---------------------------------------------------------------- screening groups

def group_baseline(sc: Screen) -> None:
    hm, gm = means(sc.bad, sc.good, [-1])
    sc.score("original", {})
    for s in (0.9, 1.0, 1.1):
        sc.score(f"heuristic 6-23 m22 pos-1 x{s}", plan_edit(hm, gm, HEUR, 22), s)


def group_positions(sc: Screen) -> None:
    """Idea 1: the direction from other / several post-instruction positions."""
    for pos in ([-2], [-2, -1], [-5, -4, -3, -2, -1]):
        hm, gm = means(sc.bad, sc.good, pos)
        sc.score(f"pos {pos} 6-23 m22", plan_edit(hm, gm, HEUR, 22))
    hm, gm = means(sc.bad, sc.good, [-4])
    sc.score("pos [-4] 6-23 m13", plan_edit(hm, gm, HEUR, 13))
    # mean of the unit directions at -4 (its best layer 13) and -1 (layer 22), each biprojected
    h4, g4 = means(sc.bad, sc.good, [-4])
    h1, g1 = means(sc.bad, sc.good, [-1])
    sc.score("unit-mean(pos-4 m13, pos-1 m22) 6-23",
             {t: unit(biprojected(h4, g4, 13, t, g1) + biprojected(h1, g1, 22, t)) for t in HEUR})


def group_local(sc: Screen) -> None:
    """Idea 2: each edited layer uses a nearby measurement."""
    hm, gm = means(sc.bad, sc.good, [-1])
    sc.score("local m=t 6-23", plan_edit(hm, gm, HEUR, lambda t: t))
    sc.score("local m=t+1 6-23", plan_edit(hm, gm, HEUR, lambda t: min(t + 1, 23)))
    sc.score("local m=max(t,16) 6-23", plan_edit(hm, gm, HEUR, lambda t: max(t, 16)))
    sc.score("blend unit(r22)+unit(r_t) 6-23",
             {t: unit(biprojected(hm, gm, 22, t) + biprojected(hm, gm, t, t)) for t in HEUR})


def gen_measure(sc: Screen, name: str, edit: dict[int, torch.Tensor], scale: float | dict[int, float] = 1.0,
                max_new_tokens: int = 128) -> list[dict[str, Any]]:
    """Generation on the 64 harmful-MEASURE prompts (a selection criterion; never the eval half)."""
    t = time.monotonic()
    sc.lab.apply(edit, scale)
    try:
        answers = generate(sc.lab.lm, sc.harmful, max_new_tokens=max_new_tokens, batch_size=BATCH, progress=False)
    finally:
        sc.lab.restore()
    rows = [{"prompt": p, "answer": a, "refused": bool(markers_in(a, MARKER_SETS["project"])),
             "markers": {k: markers_in(a, m) for k, m in MARKER_SETS.items()}} for p, a in zip(sc.harmful, answers)]
    path = sc.out / f"measure-gen-{slug(name)}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    n = {k: sum(bool(r["markers"][k]) for r in rows) for k in MARKER_SETS}
    log(f"GEN harmful-measure {name}: project {n['project']}/64, broad {n['broad']}/64, "
        f"{time.monotonic() - t:.0f} s -> {path}")
    return rows


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")


def group_gen_heuristic(sc: Screen) -> None:
    hm, gm = means(sc.bad, sc.good, [-1])
    gen_measure(sc, "heuristic", plan_edit(hm, gm, HEUR, 22))


def edited_states(sc: Screen, name: str, edit: dict[int, torch.Tensor], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Winsorized last-K residuals of the EDITED model on the measurement halves (cached)."""
    cache = sc.out / f"states-{slug(name)}.pt"
    if cache.is_file():
        d = torch.load(cache)
    else:
        sc.lab.apply(edit, scale)
        try:
            d = {"bad": sc.lab.states(sc.harmful)[0], "good": sc.lab.states(sc.harmless)[0]}
        finally:
            sc.lab.restore()
        torch.save(d, cache)
    return d["bad"].double(), d["good"].double()


def quality(hm: torch.Tensor, gm: torch.Tensor) -> list[float]:
    q = []
    for m in range(hm.shape[0]):
        r = hm[m] - gm[m]
        snr = r.norm() / max(hm[m].norm(), gm[m].norm(), 1e-30)
        q.append(float(snr * (1 - unit(hm[m]) @ unit(gm[m]))) if gm[m].any() else 0.0)
    return q


def stack(*edits: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per layer, the directions of several edits side by side (a rank-k removal)."""
    out: dict[int, list[torch.Tensor]] = {}
    for e in edits:
        for t, d in e.items():
            out.setdefault(t, []).append(d if d.dim() == 2 else d[:, None])
    return {t: torch.cat(ds, dim=1) for t, ds in out.items()}


def group_two_round(sc: Screen) -> None:
    """Idea 3: measure again on the heuristically edited model, remove that direction too."""
    hm, gm = means(sc.bad, sc.good, [-1])
    e1 = plan_edit(hm, gm, HEUR, 22)
    b2, g2 = edited_states(sc, "round2-heuristic", e1)
    h2, q2 = means(b2, g2, [-1])
    qual = quality(h2, q2)
    log("round-2 quality by layer:", " ".join(f"{m}:{x:.4f}" for m, x in enumerate(qual)))
    log("cos(r2_m, r1_22) by layer:", " ".join(f"{m}:{float(unit(h2[m] - q2[m]) @ unit(hm[22] - gm[22])):+.2f}"
                                                for m in range(1, sc.lab.L)))
    m2 = max(range(1, sc.lab.L - 1), key=lambda m: qual[m])
    log(f"round-2 measurement layer (max quality, not the last): {m2}")
    for m in sorted({m2, 22}):
        e2 = plan_edit(h2, q2, HEUR, m)
        sc.score(f"two-round r1(m22)+r2(m{m}) 6-23", stack(e1, e2))
    sc.score(f"two-round r1(m22)+r2(m{m2}) 6-23 x0.9", stack(e1, plan_edit(h2, q2, HEUR, m2)), 0.9)


def group_crossfit(sc: Screen) -> None:
    """Idea 5: is the KL on the measurement halves biased upward because the direction was
    measured on those very prompts? Cross-fit: directions from one half of the measurement
    prompts, both scores on the other half (only measurement prompts)."""
    a, b = list(range(32)), list(range(32, 64))
    for fit, test in ((a, b), (b, a)):
        hm, gm = means(sc.bad[fit], sc.good[fit], [-1])
        sc.score(f"crossfit heuristic 6-23 m22 fit {fit[0]}-{fit[-1]}", plan_edit(hm, gm, HEUR, 22),
                 harmful_idx=test, harmless_idx=test, note=f"scored on {test[0]}-{test[-1]}")
    hm, gm = means(sc.bad, sc.good, [-1])
    for test in (a, b):
        sc.score(f"in-sample heuristic 6-23 m22 scored {test[0]}-{test[-1]}", plan_edit(hm, gm, HEUR, 22),
                 harmful_idx=test, harmless_idx=test)


def refusers(sc: Screen) -> tuple[list[int], list[int]]:
    """Harmful-measure prompts the ORIGINAL opens with a refusal more likely than not (log-odds > 0), and the rest."""
    r = [i for i, x in enumerate(sc.orig_odds) if x > 0]
    return r, [i for i in range(len(sc.harmful)) if i not in r]


def refusal_conditioned(sc: Screen, contrast: str = "harmless") -> tuple[torch.Tensor, torch.Tensor]:
    """Means for a direction of refusal rather than of harm: harmful prompts the original
    refuses, against harmless ones (or against the harmful ones it answers)."""
    r, c = refusers(sc)
    hm = sc.bad[r][:, :, -1].mean(0)
    gm = sc.good[:, :, -1].mean(0)
    if contrast == "harmless":
        return hm, gm
    return hm, sc.bad[c][:, :, -1].mean(0)


def group_conditioned(sc: Screen) -> None:
    """Idea 4a: a direction of refusal, from the prompts the original refuses (measurement half only)."""
    r, c = refusers(sc)
    log(f"original refuses (first-token log-odds > 0) {len(r)}/64 harmful-measure prompts")
    hm, gm = refusal_conditioned(sc)
    sc.score("refusers-vs-harmless 6-23 m22", plan_edit(hm, gm, HEUR, 22))
    hb, cb = refusal_conditioned(sc, "compliers")
    _, g1 = means(sc.bad, sc.good, [-1])
    # refusers vs compliers (both harmful); biprojection against the HARMLESS means as always
    sc.score("refusers-vs-compliers 6-23 m22",
             {t: unit(remove(remove(hb[22] - cb[22], unit(g1[22])), unit(g1[t]))) for t in HEUR})
    h1, _ = means(sc.bad, sc.good, [-1])
    e1 = plan_edit(h1, g1, HEUR, 22)
    sc.score("rank2 heuristic + refusers-vs-compliers m22 6-23",
             stack(e1, {t: unit(remove(remove(hb[22] - cb[22], unit(g1[22])), unit(g1[t]))) for t in HEUR}))


def group_pca(sc: Screen) -> None:
    """Idea A: rank 2, the mean direction plus the top principal direction of the harmful
    residuals (at m22, after removing the mean direction and the harmless mean)."""
    h1, g1 = means(sc.bad, sc.good, [-1])
    e1 = plan_edit(h1, g1, HEUR, 22)
    x = sc.bad[:, 22, -1] - g1[22]
    r1 = unit(h1[22] - g1[22])
    x = x - (x @ r1)[:, None] * r1
    x = x - x.mean(0)
    _, _, vt = torch.linalg.svd(x, full_matrices=False)
    pc = vt[0]
    odds = sc.orig_odds
    sign = 1.0 if float(torch.corrcoef(torch.stack([x @ pc, odds]))[0, 1]) >= 0 else -1.0
    log(f"pc1 of harmful residuals: corr with original refusal odds {float(torch.corrcoef(torch.stack([x @ pc, odds]))[0, 1]):+.2f}")
    sc.score("rank2 heuristic + pc1(harmful) m22 6-23",
             stack(e1, {t: unit(remove(remove(sign * pc, unit(g1[22])), unit(g1[t]))) for t in HEUR}))


def conditioned_means(sc: Screen, idx: list[int] | None = None, threshold: float = 0.0,
                      positions: tuple[int, ...] = (-1,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [L, W] of the harmful prompts (among ``idx``) the original refuses (log-odds > threshold),
    and of the harmless prompts (among ``idx``)."""
    idx = list(range(len(sc.harmful))) if idx is None else idx
    r = [i for i in idx if sc.orig_odds[i] > threshold]
    p = [K + q for q in positions]
    return sc.bad[r][:, :, p].mean(dim=(0, 2)), sc.good[idx][:, :, p].mean(dim=(0, 2))


def heuristic_plan_of(hm: torch.Tensor, gm: torch.Tensor) -> tuple[int, range]:
    """The project's `analyze --suggest-plan` rule applied to these means."""
    from rewriter.directions import Measurements
    from rewriter.lab.analyze import layer_metrics, suggest_plan

    L = hm.shape[0]
    plan = suggest_plan(layer_metrics(Measurements({n: hm[n] for n in range(L)}, {n: gm[n] for n in range(L)}, 1, 1)), L)
    layers = [e.layer for e in plan.entries]
    return plan.entries[0].measurement, range(min(layers), max(layers) + 1)


def group_cond2(sc: Screen) -> None:
    hm, gm = conditioned_means(sc)
    m, rng = heuristic_plan_of(hm, gm)
    log(f"suggest-plan rule on the refusal-conditioned means: measurement {m}, layers {rng.start}-{rng.stop - 1}")
    if (m, rng) != (22, HEUR):
        sc.score(f"refusers-vs-harmless suggest-plan {rng.start}-{rng.stop - 1} m{m}", plan_edit(hm, gm, rng, m))
    for s in (0.9, 1.1):
        sc.score(f"refusers-vs-harmless 6-23 m22 x{s}", plan_edit(hm, gm, HEUR, 22), s)
    hm1, gm1 = conditioned_means(sc, threshold=1.0)
    sc.score(f"refusers(odds>1, n={sum(int(x > 1) for x in sc.orig_odds)})-vs-harmless 6-23 m22", plan_edit(hm1, gm1, HEUR, 22))
    hm5, gm5 = conditioned_means(sc, positions=(-5, -4, -3, -2, -1))
    sc.score("refusers-vs-harmless pos[-5..-1] 6-23 m22", plan_edit(hm5, gm5, HEUR, 22))


def group_cond_crossfit(sc: Screen) -> None:
    """The refusal-conditioned direction, cross-fitted: refusers chosen and means taken on one half
    of the measurement prompts, scored on the other half (against the plain direction, the same way)."""
    a, b = list(range(32)), list(range(32, 64))
    for fit, test in ((a, b), (b, a)):
        hm, gm = conditioned_means(sc, fit)
        sc.score(f"crossfit refusers-vs-harmless fit {fit[0]}-{fit[-1]}", plan_edit(hm, gm, HEUR, 22),
                 harmful_idx=test, harmless_idx=test, note=f"scored on {test[0]}-{test[-1]}")




# ---------------------------------------------------------------- finalists

def v_heuristic(sc: Screen) -> tuple[dict[int, torch.Tensor], float]:
    hm, gm = means(sc.bad, sc.good, [-1])
    return plan_edit(hm, gm, HEUR, 22), 1.0


def v_conditioned(scale: float) -> Callable[[Screen], tuple[dict[int, torch.Tensor], float]]:
    def build(sc: Screen) -> tuple[dict[int, torch.Tensor], float]:
        hm, gm = conditioned_means(sc)
        return plan_edit(hm, gm, HEUR, 22), scale
    return build


VARIANTS: dict[str, Callable[[Screen], tuple[dict[int, torch.Tensor], float]]] = {
    "heuristic": v_heuristic,
    "conditioned": v_conditioned(1.0),
    "conditioned-x0.9": v_conditioned(0.9),
    "conditioned-x1.1": v_conditioned(1.1),
}


def group_gen_conditioned(sc: Screen) -> None:
    edit, scale = VARIANTS["conditioned"](sc)
    gen_measure(sc, "conditioned", edit, scale)


def write_checkpoint(sc: Screen, name: str, path: Path) -> None:
    """The variant's edit applied in memory, written as a bf16 checkpoint that `abliterate
    evaluate` reads (the edited weights are already bf16 values, so nothing is rounded twice)."""
    import shutil

    edit, scale = VARIANTS[name](sc)
    sc.lab.apply(edit, scale)
    model = sc.lab.lm.model
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)
    sc.lab.restore()
    src = example_model(MODEL)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json") and f.is_file():
            shutil.copy(f, path / f.name)
    log(f"checkpoint of {name}: {path}")


# in the order they were run; `screen` with no names runs them all (about 20 min on 1 thread)
GROUPS: dict[str, Callable[[Screen], None]] = {
    "baseline": group_baseline, "positions": group_positions, "local": group_local,   # ideas 1, 2
    "gen_heuristic": group_gen_heuristic, "two_round": group_two_round,                 # idea 3
    "conditioned": group_conditioned, "pca": group_pca,                                 # idea 4
    "crossfit": group_crossfit,                                                         # idea 5
    "cond2": group_cond2, "cond_crossfit": group_cond_crossfit,
    "gen_conditioned": group_gen_conditioned,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["screen", "final"])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--out", type=Path, default=Path("/tmp/r15"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lab = Lab(args.threads)
    if args.command == "screen":
        sc = Screen(lab, args.out)
        for g in args.names or list(GROUPS):
            t = time.monotonic()
            GROUPS[g](sc)
            log(f"[group {g}: {time.monotonic() - t:.0f} s]")
    else:
        sc = Screen(lab, args.out)
        for name in args.names:
            write_checkpoint(sc, name, args.out / f"ckpt-{slug(name)}")


if __name__ == "__main__":
    main()
