"""What can a GROUP-BLIND model buy where the group-aware stacking gains? Ideal-observer fronts.

The sibling of reweighting_ceiling.py, in the same Gaussian model (one signal per modality,
s_m = (2y - 1) d[m][g] / 2 + N(0, 1), independent given y; d' from the table's unimodal rows
or given with --dprime). For data with no group cue in the input it prints, per score:

- `aware`: the group-aware ideal, each group's own log-likelihood ratio (what stacking told the
  group approaches);
- `distilled`: E[aware | s], the best a student fitted to the aware teacher's margins can
  converge to without the group (the group posterior p(g | s) weighting each group's ratio);
- `reweighted k`: the group-blind posterior with the minorities' priors scaled by k (what
  reweighting the training loss converges to; reweighting_ceiling.py);
- `blind stacking p`: the group-blind recombination of `group_fusion: blind_stacking`: ONE
  logistic regression of y on (k = 1 posterior, s_fundus, s_oct) for everyone, each sample of
  group g weighted (N / (G n_g))^p (its population fit: p = 0 is plain training's posterior).

and each score's AUC, ES-AUC and group AUCs, with the change from the k = 1 posterior (plain
training's ideal). A group-blind model cannot beat the best group-blind score; the script
says which group-blind family trades the least AUC for its ES-AUC.

    .venv/bin/python benchmarks/blind_fusion_ceiling.py --dprime 0.71 0.59 2.21 --dprime 1.12 1.14 1.11
    .venv/bin/python benchmarks/blind_fusion_ceiling.py RESULTS_JSON --unimodal "fundus only" "oct only"
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.special import expit, logsumexp
from scipy.stats import norm

from multifair.methods.group_fusion import fit_blind_stacking
from multifair.metrics import es_auc, roc_auc  # the same metrics as the benchmark tables


def _metrics(y: np.ndarray, margin: np.ndarray, g: np.ndarray, n_groups: int) -> dict:
    score = expit(margin)  # the metrics take probabilities
    row = {"auc": roc_auc(y, score), "es_auc": es_auc(y, score, groups=g)}
    for h in range(n_groups):
        row[f"auc/{h}"] = roc_auc(y[g == h], score[g == h])
    return row


def fronts(
    d: np.ndarray,
    mix: np.ndarray,
    ks: list[float],
    powers: list[float],
    n: int,
    seed: int,
) -> list[tuple[str, dict]]:
    """d: (M, G) d' per modality and group; mix: (G,) group shares. (label, metrics) rows."""
    rng = np.random.default_rng(seed)
    mix = mix / mix.sum()
    n_groups = len(mix)
    g = rng.choice(n_groups, size=n, p=mix)
    y = rng.integers(0, 2, size=n)
    s = (2 * y - 1)[None, :] * d[:, g] / 2 + rng.standard_normal((d.shape[0], n))  # (M, n)
    loglik = {
        c: -0.5 * ((s[:, None, :] - (2 * c - 1) * d[:, :, None] / 2) ** 2).sum(axis=0)
        for c in (0, 1)
    }  # (G, n): log p(s | y = c, group h) up to a constant
    rows: list[tuple[str, dict]] = []
    ratio = loglik[1] - loglik[0]  # (G, n) each group's own log-likelihood ratio
    rows.append(("aware (told the group) †", _metrics(y, ratio[g, np.arange(n)], g, n_groups)))
    log_mix = np.log(mix)[:, None]
    joint = np.logaddexp(loglik[0], loglik[1]) + log_mix  # log p(s, h) up to a constant
    p_group = np.exp(joint - logsumexp(joint, axis=0))  # (G, n) p(h | s)
    rows.append(("distilled: E[aware | s]", _metrics(y, (p_group * ratio).sum(0), g, n_groups)))
    majority = int(np.argmax(mix))
    posterior = None
    for k in sorted({1.0, *ks}):
        w = np.where(np.arange(n_groups) == majority, 1.0, k)
        prior = np.log(w * mix / (w * mix).sum())[:, None]
        margin = logsumexp(loglik[1] + prior, axis=0) - logsumexp(loglik[0] + prior, axis=0)
        if k == 1.0:
            posterior = margin
        rows.append((f"reweighted k = {k:g}", _metrics(y, margin, g, n_groups)))
    x = np.concatenate([posterior[:, None], s.T], axis=1)  # (n, 1 + M)
    for p in powers:
        weight, bias = fit_blind_stacking(x, y, g, x, y, n_groups, prior=1e-3, power=p)
        label = f"blind stacking p = {p:g} (w = {', '.join(f'{v:.2f}' for v in weight)})"
        rows.append((label, _metrics(y, np.clip(x, -16.1, 16.1) @ weight + bias, g, n_groups)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="?", help="a benchmark's results/results.json")
    ap.add_argument("--unimodal", nargs="+", help="the unimodal reference rows of RESULTS")
    ap.add_argument(
        "--dprime",
        nargs="+",
        type=float,
        action="append",
        help="d' per group of one modality (repeat per modality), instead of RESULTS",
    )
    ap.add_argument("--groups", nargs="+", default=["Asian", "Black", "White"])
    ap.add_argument("--mix", nargs="+", type=float, default=[0.10, 0.15, 0.75])
    ap.add_argument("--weights", nargs="+", type=float, default=[2, 4, 8])
    ap.add_argument("--powers", nargs="+", type=float, default=[0, 0.25, 0.5, 0.75, 1, 1.5])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    groups = args.groups
    if args.dprime:
        d = np.array(args.dprime, dtype=np.float64)
    elif args.results and args.unimodal:
        table = json.loads(args.results.read_text())["tables"][0]
        groups, rows = table["groups"], {r["label"]: r for r in table["rows"]}
        aucs = [[rows[u]["mean"][f"auc/{h}"] for h in groups] for u in args.unimodal]
        d = math.sqrt(2) * norm.ppf(np.clip(np.array(aucs), 0.5, 0.9999))
    else:
        raise SystemExit("give RESULTS with --unimodal, or --dprime per modality")
    if d.shape[1] != len(groups) or len(args.mix) != len(groups):
        raise SystemExit(f"every --dprime and --mix needs {len(groups)} values ({groups})")
    print(
        "d' per group ("
        + ", ".join(groups)
        + "): "
        + "; ".join(", ".join(f"{v:.2f}" for v in row) for row in d)
    )
    out = fronts(d, np.asarray(args.mix), args.weights, args.powers, args.n, args.seed)
    base = dict(out)["reweighted k = 1"]
    print(
        "\n| score | AUC | ES-AUC | "
        + " | ".join(f"AUC {h}" for h in groups)
        + " | Δ AUC | Δ ES-AUC |"
    )
    print("|---" * (len(groups) + 5) + "|")
    for label, r in out:
        cells = [label, f"{r['auc']:.3f}", f"{r['es_auc']:.3f}"]
        cells += [f"{r[f'auc/{h}']:.3f}" for h in range(len(groups))]
        cells += [f"{r['auc'] - base['auc']:+.3f}", f"{r['es_auc'] - base['es_auc']:+.3f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
