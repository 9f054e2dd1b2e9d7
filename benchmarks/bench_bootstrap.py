"""Bootstrap CIs: the vectorised `bootstrap_metrics` vs a naive per-resample loop.

Workload (issue 2): 3,000 predictions, 3 groups, 1,000 resamples, every metric (overall AUC,
group AUCs, ES-AUC, ES-ACC, DPD, DEOdds, per-group accuracy / selection rate / TPR / FPR).
The naive loop calls scikit-learn (AUC) and fairlearn (DPD, DEOdds) per resample, with numpy
for the rest; it runs on the first --naive-resamples resamples and is extrapolated linearly.
Both run on one thread. Prints a Markdown table; also checks that the two agree on the shared
resamples.

    .venv/bin/python benchmarks/bench_bootstrap.py [--n 3000] [--n-boot 1000] [--naive-resamples 30]
"""

from __future__ import annotations

import os

# One core, as the issue states the target; set before numpy loads its BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from multifair.metrics import bootstrap_indices, bootstrap_metrics  # noqa: E402


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    y_true = (rng.random(n) < 0.4).astype(np.int64)
    y_score = np.round(
        1 / (1 + np.exp(-(1.6 + 0.3 * groups) * (y_true - 0.5) - rng.normal(0, 1, n))), 3
    )
    return y_true, y_score, groups


def naive_resample(y: np.ndarray, s: np.ndarray, g: np.ndarray, threshold: float = 0.5) -> dict:
    """Every metric of one resample, the way a per-resample script computes it."""
    y_pred = (s >= threshold).astype(np.int64)
    auc = roc_auc_score(y, s)
    acc = float(np.mean(y_pred == y))
    group_auc, group_acc = [], []
    for code in np.unique(g):
        m = g == code
        group_auc.append(roc_auc_score(y[m], s[m]) if 0 < y[m].sum() < m.sum() else np.nan)
        group_acc.append(float(np.mean(y_pred[m] == y[m])))
        _ = (y_pred[m].mean(), y_pred[m][y[m] == 1].mean(), y_pred[m][y[m] == 0].mean())
    group_auc = np.array(group_auc)
    return {
        "es_auc": auc / (1 + np.nansum(np.abs(group_auc - auc))),
        "es_acc": acc / (1 + np.sum(np.abs(np.array(group_acc) - acc))),
        "dpd": demographic_parity_difference(y, y_pred, sensitive_features=g),
        "deodds": equalized_odds_difference(y, y_pred, sensitive_features=g),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--naive-resamples", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="vectorised timing: best of")
    args = parser.parse_args()

    y, s, g = make_data(args.n)
    features = {"race": g}
    bootstrap_metrics(y, s, sensitive_features=features, n_boot=5)  # warm-up (imports, caches)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = bootstrap_metrics(y, s, sensitive_features=features, n_boot=args.n_boot, seed=0)
        times.append(time.perf_counter() - start)
    fast_s = min(times)

    indices = bootstrap_indices(args.n, args.n_boot, seed=0)[: args.naive_resamples]
    start = time.perf_counter()
    naive = [naive_resample(y[idx], s[idx], g[idx]) for idx in indices]
    naive_per = (time.perf_counter() - start) / len(indices)
    naive_s = naive_per * args.n_boot

    rep = fast["attributes"]["race"]
    diff = max(
        float(np.nanmax(np.abs(rep[k][: len(indices)] - np.array([r[k] for r in naive]))))
        for k in ("es_auc", "es_acc", "dpd", "deodds")
    )
    print(
        f"Bootstrap CIs: {args.n} predictions, 3 groups, {args.n_boot} resamples, all metrics, "
        "1 thread"
    )
    print()
    print("| method | resamples timed | seconds for all resamples | ms per resample |")
    print("|---|---|---|---|")
    print(
        f"| vectorised `bootstrap_metrics` (best of {args.repeats}) | {args.n_boot} | "
        f"{fast_s:.2f} | {1000 * fast_s / args.n_boot:.2f} |"
    )
    print(
        f"| naive loop (sklearn AUC + fairlearn DPD/DEOdds per resample) | "
        f"{len(indices)}, extrapolated | {naive_s:.1f} | {1000 * naive_per:.1f} |"
    )
    print()
    print(
        f"speed-up: {naive_s / fast_s:.0f}x; largest |difference| in ES-AUC/ES-ACC/DPD/DEOdds "
        f"on the {len(indices)} shared resamples: {diff:.1e}"
    )


if __name__ == "__main__":
    main()
