"""How much ES-AUC can group weights buy at best, for a model that cannot see the group?

An ideal-observer bound for a benchmark table whose data carry no group cue (the synthetic
generators): each modality m is modelled as one Gaussian signal per sample,

    s_m = (2y - 1) * d[m][g] / 2 + N(0, 1)      (independent across modalities given y)

with d[m][g] = sqrt(2) * Phi^-1(AUC[m][g]), the per-group test AUCs of the table's unimodal
reference rows (what the trained encoders actually extract, not the generator's latents).
Training with the task loss of group g weighted by w_g converges, for an unrestricted
group-blind model, to the posterior with the group priors scaled by w_g:

    score(s) = log sum_g w_g pi_g p(s | y=1, g) - log sum_g w_g pi_g p(s | y=0, g)

The script draws --n samples and prints, for each minority weight k (every group but the
largest weighted k, the largest 1), the overall AUC, ES-AUC and group AUCs of that score, and
their change from k = 1 (plain training's ideal). Beside them, the table's own rows. A method
that trades between groups by weighting them cannot do better than this curve with encoders
as good as these; doing better needs better features for the weak groups.

    .venv/bin/python benchmarks/reweighting_ceiling.py runs/benchmarks/synth_fairvision_large/results/results.json \
        --unimodal "fundus only" "oct only" [--mix 0.10 0.15 0.75] [--n 400000]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.special import expit, logsumexp
from scipy.stats import norm

from multifair.metrics import es_auc, roc_auc


def effective_dprime(row: dict, groups: list[str]) -> np.ndarray:
    """d' per group from a unimodal row's mean test AUC per group (binormal, unit variance)."""
    aucs = np.array([row["mean"][f"auc/{g}"] for g in groups])
    return math.sqrt(2) * norm.ppf(np.clip(aucs, 0.5, 0.9999))


def simulate(
    d: np.ndarray, mix: np.ndarray, weights: list[float], n: int, seed: int
) -> list[dict[str, float]]:
    """d: (M, G) d' per modality and group; mix: (G,) group shares. One row per minority
    weight k: AUC, ES-AUC and each group's AUC of the reweighted group-blind posterior."""
    rng = np.random.default_rng(seed)
    g = rng.choice(len(mix), size=n, p=mix / mix.sum())
    y = rng.integers(0, 2, size=n)
    s = (2 * y - 1)[None, :] * d[:, g] / 2 + rng.standard_normal((d.shape[0], n))  # (M, n)
    # log p(s | y, h) for every group h: sum over modalities of the Gaussian log density
    loglik = {
        c: -0.5 * ((s[:, None, :] - (2 * c - 1) * d[:, :, None] / 2) ** 2).sum(axis=0)
        for c in (0, 1)
    }  # (G, n) each
    majority = int(np.argmax(mix))
    rows = []
    for k in weights:
        w = np.where(np.arange(len(mix)) == majority, 1.0, k)
        prior = np.log(w * mix / (w * mix).sum())[:, None]
        logit = logsumexp(loglik[1] + prior, axis=0) - logsumexp(loglik[0] + prior, axis=0)
        score = expit(logit)  # the metrics take probabilities
        row = {"k": k, "auc": roc_auc(y, score), "es_auc": es_auc(y, score, groups=g)}
        for h in range(len(mix)):
            row[f"auc/{h}"] = roc_auc(y[g == h], score[g == h])
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="a benchmark's results/results.json")
    ap.add_argument("--unimodal", nargs="+", required=True, help="the unimodal reference rows")
    ap.add_argument(
        "--mix",
        nargs="+",
        type=float,
        default=[0.10, 0.15, 0.75],
        help="group shares in the table's group order (default: the generator's)",
    )
    ap.add_argument("--weights", nargs="+", type=float, default=[1, 1.5, 2, 3, 4, 8])
    ap.add_argument("--n", type=int, default=400_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", type=int, default=0, help="which table of the file (default 0)")
    args = ap.parse_args()

    try:
        tables = json.loads(args.results.read_text())["tables"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"{args.results}: not a benchmark results.json ({exc!r})") from None
    if not 0 <= args.table < len(tables):
        raise SystemExit(f"--table {args.table}: {args.results} has {len(tables)} table(s)")
    table = tables[args.table]
    groups, rows = table["groups"], {r["label"]: r for r in table["rows"]}
    missing = [u for u in args.unimodal if u not in rows]
    if missing:
        raise SystemExit(f"no row {missing} in {args.results}; rows: {sorted(rows)}")
    if len(args.mix) != len(groups):
        raise SystemExit(f"--mix needs {len(groups)} shares ({', '.join(groups)})")
    d = np.stack([effective_dprime(rows[u], groups) for u in args.unimodal])
    if not np.isfinite(d).all():
        raise SystemExit(f"{args.unimodal}: a group AUC is missing (NaN) in these rows")
    print(f"effective d' per group ({', '.join(groups)}), from the unimodal rows' test AUCs:")
    for u, dm in zip(args.unimodal, d):
        print(f"  {u}: " + ", ".join(f"{x:.2f}" for x in dm))
    weights = sorted({1.0, *args.weights})  # k = 1 (no weights) is the baseline of the deltas
    sim = simulate(d, np.asarray(args.mix), weights, args.n, args.seed)
    base = sim[0]
    head = "| minority weight k | AUC | ES-AUC | " + " | ".join(f"AUC {g}" for g in groups)
    print(f"\n{head} | Δ AUC | Δ ES-AUC |")
    print("|---" * (len(groups) + 5) + "|")
    for r in sim:
        cells = [f"{r['k']:g}", f"{r['auc']:.3f}", f"{r['es_auc']:.3f}"]
        cells += [f"{r[f'auc/{h}']:.3f}" for h in range(len(groups))]
        cells += [f"{r['auc'] - base['auc']:+.3f}", f"{r['es_auc'] - base['es_auc']:+.3f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nthe table's rows (test, mean over seeds):")
    for label, r in rows.items():
        if r.get("reference_only") or label in args.unimodal:
            continue
        m = r["mean"]
        cells = [f"{m['auc']:.3f}", f"{m['es_auc']:.3f}"] + [f"{m[f'auc/{g}']:.3f}" for g in groups]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
