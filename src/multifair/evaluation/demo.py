"""`multifair demo`: the problem and the project's best answers, on synthetic data, in minutes.

The data (generated once into a cache folder, then cached as memory-mapped uint8 tensors)
follows the spec's `main` scenario in the FairVision format: 2,000 patients with a fundus photo
and an OCT volume; the fundus carries a brightness cue that is strong for the White majority
and weak for the Asian and Black minorities, the OCT a texture cue for everyone. Plain joint
training leans on the fundus and leaves the minorities behind.

The demo is a small benchmark (`multifair benchmark`, the same plan, runs, tables and HTML
report): `erm`, MultiFair as published, the recommended group-blind method and the recommended
group-aware one (told the group at test time, †), over three training seeds on one data draw,
plus one single-modality model per modality, which shows that the demo's encoders learn both
modalities (so a group gap is the fusion's, not a lagging encoder's). It prints one compact
table: per-group AUCs, paired differences to `erm` with their 95% intervals, and one line per
row saying what it means.

`DEMO_CONFIG` is the training recipe (`configs/demo.yaml` holds the same settings, the base of
the image benchmarks); `demo_benchmark` builds the comparison (`configs/benchmarks/demo.yaml`
holds the same matrix; tests keep both equal), so `multifair benchmark
configs/benchmarks/demo.yaml` reproduces it.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from multifair.config import deep_merge, parse_overrides

# The generator's knobs: 2,000 subjects, race mix 10/15/75 (Asian/Black/White), 50% positive.
DEMO_KNOBS: dict[str, Any] = {
    "flavour": "fairvision",
    "scenario": "main",
    "n": 2000,
    "seed": 0,
    "split": [0.5, 0.2, 0.3],
    # at the demo's 32 px / 4 slices the default OCT texture (a retina band) is not learnable;
    # a whole-slice texture with a stronger tilt is (docs/data.md)
    "oct_region": "slice",
    "oct_tilt": 0.3,
}

# The training recipe, = configs/demo.yaml (the base of every image benchmark config).
DEMO_CONFIG: dict[str, Any] = {
    "data": {
        "kind": "fairvision",
        "root": None,  # filled in: the demo's cache folder
        "attribute": "race",
        "image_size": 32,
        "oct_slices": 4,
        "num_workers": 0,
    },
    "model": {
        "preset": "small",
        "dim": 32,
        "heads": 2,
        "layers": 1,
        "encoders": {
            "fundus": {"width": 8, "depth": 3},
            "oct": {"slice_options": {"width": 8, "depth": 3}},
        },
    },
    "method": {"name": "multifair"},
    "train": {
        "seed": 0,
        "epochs": 6,
        "batch_size": 32,
        "lr": 2.0e-3,
        "aux_lr": 2.0e-3,
        "schedule": "cosine",
        "warmup_steps": 10,
        "log_every": 5,
    },
    "output": {"n_boot": 200, "predictions": ["test"]},
}

# What the demo changes on top of the recipe. A ONE-block OCT slice encoder: the OCT cue is a
# streak orientation that each further strided block blurs; with one block the OCT head
# reaches what the ideal observer gets from the volume (docs/results.md, "one-block OCT").
DEMO_OVERRIDES: dict[str, Any] = {
    "model": {"encoders": {"oct": {"slice_options": {"width": 8, "depth": 1}}}},
    "train": {"epochs": 8, "select_from": 3, "progress": False, "tensorboard": False},
    "output": {"n_boot": 0, "predictions": ["test"]},
}

DEMO_SEEDS = (0, 1, 2)
REFERENCE = "erm"
GROUP_BLIND = "recommended group-blind"
GROUP_AWARE = "recommended group-aware"

# (label, method block, what the row is) - the rows of the comparison, in print order.
ROWS: list[tuple[str, dict[str, Any], str]] = [
    (REFERENCE, {"name": "erm"}, "plain joint training"),
    ("multifair", {"name": "multifair"}, "MultiFair as published (gradient factors + losses)"),
    (
        GROUP_BLIND,
        {
            "name": "multifair_adam",
            "temperature": math.inf,
            "group_fusion": "blind_stacking",
            "stacking_data": "train+validation",
            "blind_power": 0.7,
        },
        "one model for everyone: one mix of the fused and modality heads, fitted with the "
        "minorities weighted up",
    ),
    (
        GROUP_AWARE,
        {
            "name": "multifair_adam",
            "temperature": math.inf,
            "group_fusion": "stacking",
            "stacking_data": "train+validation",
        },
        "told the group at test time: each group's own mix of the fused and modality heads",
    ),
]
MODALITIES = ("fundus", "oct")
NAME = 32  # width of the method column
HEAD_TOLERANCE = 0.02  # a fused model's head this close to its single-modality model: learnt


def default_cache() -> Path:
    """$MULTIFAIR_CACHE, else $XDG_CACHE_HOME/multifair, else ~/.cache/multifair."""
    if os.environ.get("MULTIFAIR_CACHE"):
        return Path(os.environ["MULTIFAIR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "multifair"


def ensure_data(cache: Path, knobs: Mapping[str, Any] = DEMO_KNOBS) -> tuple[Path, dict[str, Any]]:
    """Generate the demo dataset (once per set of knobs) and its uint8 cache; return
    (root, synth_meta)."""
    import json

    from multifair.data import DataConfig, prepare_cache
    from multifair.data.synthetic import SynthKnobs, generate

    knobs = SynthKnobs(**knobs)
    root = cache / f"demo-fairvision-{knobs.n}"
    meta_path = root / "synth_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is None or meta.get("knobs") != knobs.model_dump(mode="json"):
        print(f"generating the synthetic FairVision-format demo data in {root} (once) ...")
        meta = generate(knobs, root, force=True, progress=False)
    data_cfg = DataConfig(**{**DEMO_CONFIG["data"], "root": root})
    # a memory-mapped uint8 copy at the model's input size: epochs read it, not the npz files
    prepare_cache(data_cfg, progress=False)
    return root, meta


def demo_benchmark(
    root: Path,
    out_dir: Path,
    *,
    seeds: Sequence[int] = DEMO_SEEDS,
    overrides: Sequence[str] = (),
    knobs: Mapping[str, Any] = DEMO_KNOBS,
    workers: int | None = None,
) -> Any:
    """The demo's comparison as a benchmark config (rows x seeds on the data in `root`)."""
    from multifair.config import validate
    from multifair.evaluation.benchmark import BenchmarkConfig

    recipe = deep_merge(DEMO_CONFIG, {"data": {"root": str(root)}})
    recipe = deep_merge(recipe, DEMO_OVERRIDES)
    recipe = deep_merge(recipe, parse_overrides(list(overrides)))
    # two runs at a time on two cores (one thread each: small models scale poorly in threads)
    workers = workers or max(1, min(6, os.cpu_count() or 1))
    synth_knobs = {k: v for k, v in knobs.items() if k not in ("flavour", "scenario")}
    synth = {"flavour": "fairvision", "scenario": knobs["scenario"], "out": str(root)}
    synth["knobs"] = synth_knobs
    methods = [{"label": label, "method": method} for label, method, _ in ROWS]
    methods += [
        {"label": f"{m} only", "method": {"name": "unimodal", "modality": m}} for m in MODALITIES
    ]
    spec = {
        "name": "demo",
        "output": str(out_dir),
        "overrides": recipe,
        "datasets": [{"label": "fairvision", "synth": synth}],
        "attributes": [recipe["data"]["attribute"]],
        "seeds": list(seeds),
        "reference": REFERENCE,
        "workers": workers,
        "threads_per_run": 1,
        "n_boot": 200,
        "launcher": "preloaded",
        "methods": methods,
    }
    return validate(BenchmarkConfig, spec, source="multifair demo")


def run_demo(
    cache: str | None = None,
    out: str | None = None,
    overrides: Sequence[str] = (),
    knobs: Mapping[str, Any] = DEMO_KNOBS,
    seeds: Sequence[int] = DEMO_SEEDS,
    workers: int | None = None,
) -> int:
    """Generate (once), train every row x seed (finished runs in `out` are reused), print the
    comparison and write the HTML report. `overrides` apply to every run (e.g.
    train.epochs=2); `knobs` change the generated data (tests use fewer subjects)."""
    from multifair.evaluation import benchmark as bm
    from multifair.evaluation import benchmark_report as br
    from multifair.evaluation import benchmark_tables as bt
    from multifair.evaluation.report import write_report
    from multifair.training.config import resolve_run_config

    started = time.monotonic()
    out_dir = Path(out) if out else Path("runs") / "demo"
    cache_dir = Path(cache) if cache else default_cache()
    # a mistake in an override is one line now, not 18 failed runs after the data is generated
    recipe = deep_merge(deep_merge(DEMO_CONFIG, {"data": {"root": str(cache_dir)}}), DEMO_OVERRIDES)
    resolve_run_config(None, list(overrides), base=recipe)
    print(
        f"multifair demo: {knobs['n']:,} synthetic patients (fundus photo + OCT volume), race "
        "groups Asian / Black / White at 10 / 15 / 75%.\nThe fundus cue is strong for White "
        "patients and weak for the minorities; the OCT cue serves everyone.\n"
    )
    print("1/3 data")
    root, _ = ensure_data(cache_dir, knobs)
    print(f"    {root}")
    cfg = demo_benchmark(
        root, out_dir.resolve(), seeds=seeds, overrides=overrides, knobs=knobs, workers=workers
    )
    runs = bm.plan(cfg, Path(cfg.output))
    bm.write_manifest(cfg, Path(cfg.output))
    # runs finished with other settings (other overrides, an older demo) are trained again
    for run in bm.stale_runs(Path(cfg.output), runs):
        shutil.rmtree(run.run_dir)
    print(
        f"\n2/3 training {len(cfg.methods)} models x {len(cfg.seeds)} seeds "
        f"({cfg.workers} at a time; logs in {out_dir / 'logs'})"
    )
    outcomes = _execute_with_progress(cfg, runs, bm)
    collection = bm.collect(Path(cfg.output), cfg)
    tables = bt.build_tables(collection)
    if not tables:
        print("no run finished; see the logs above", file=sys.stderr)
        return 1
    br.write_results(tables, collection)
    report = write_report(Path(cfg.output), collection=collection, tables=tables)
    print(f"\n3/3 results (test split, {_test_size(collection)} patients)\n")
    print(comparison_table(tables[0], len(cfg.seeds)))
    minutes = (time.monotonic() - started) / 60
    print(f"\nreport: {report}   (every table, ROC curves, training dynamics)")
    print(f"tables: {out_dir / 'results' / 'results.md'}")
    print(
        f"done in {minutes:.1f} min. Next: `multifair diagnose CONFIG` on your own data "
        "(docs/diagnose.md); the same comparison: `multifair benchmark configs/benchmarks/demo.yaml`."
    )
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _execute_with_progress(cfg: Any, runs: Sequence[Any], bm: Any) -> list[Any]:
    """`benchmark.execute` with one bar over the runs in a terminal; elsewhere one line a run."""
    from tqdm.auto import tqdm

    todo = sum(not bm.is_finished(r) for r in runs)
    bar = tqdm(total=todo, unit="run", disable=not sys.stdout.isatty() or todo == 0)
    (Path(cfg.output) / "logs").mkdir(parents=True, exist_ok=True)
    log = (Path(cfg.output) / "logs" / "demo.log").open("a", encoding="utf-8")

    def echo(text: str) -> None:
        log.write(text + "\n")
        log.flush()
        if bar.disable and not text.startswith("["):
            print(f"    {text}", flush=True)  # no terminal: one line per finished run
        elif text.startswith("FAILED"):
            bar.write(text)

    try:
        return bm.execute(cfg, runs, Path(cfg.output), echo=echo, on_done=lambda _: bar.update())
    finally:
        bar.close()
        log.close()


def _test_size(collection: Any) -> int | str:
    first = collection.finished[0].metrics if collection.finished else {}
    return first.get("test", {}).get("n", "?")


def comparison_table(table: Any, n_seeds: int) -> str:
    """The demo's table: is each modality learnt, then every row's test metrics with paired
    differences to `erm`, and one line per row saying what it means."""
    rows = {row.label: row for row in table.rows}
    groups = list(table.groups)
    lines = _modality_lines(rows)
    head = f"  {'method':<{NAME}}{'AUC':>7}{'ES-AUC':>8}" + "".join(f"{g[:7]:>8}" for g in groups)
    head += f"   {'ΔAUC vs erm':<24}   {'ΔES-AUC vs erm'}"
    lines += ["", f"  mean of {n_seeds} seeds; Δ: paired difference to erm, 95% CI over seeds", ""]
    lines += [head, ""]  # the rule under the header: filled in once the rows are known
    rule = len(lines) - 1
    for label, _, _ in ROWS:
        row = rows.get(label)
        if row is None:
            lines.append(f"  {label:<{NAME}}  (no finished run)")
            continue
        name = label + (" †" if row.uses_attribute_at_test else "")
        cells = f"{_num(row.mean.get('auc')):>7}{_num(row.mean.get('es_auc')):>8}"
        cells += "".join(f"{_num(row.mean.get(f'auc/{g}')):>8}" for g in groups)
        paired = ""
        if label != REFERENCE:
            paired = "   ".join(f"{_paired(row.paired.get(m)):<24}" for m in ("auc", "es_auc"))
            paired = "   " + paired.rstrip()
        lines.append(f"  {name:<{NAME}}{cells}{paired}")
    lines[rule] = "  " + "-" * (max(len(line) for line in lines[rule + 1 :]) - 2)
    best = (table.best_achievable or {}).get("best achievable (all modalities)") or {}
    if best:
        cells = f"{_num(best.get('auc')):>7}{'':>8}" + "".join(
            f"{_num(best.get(f'auc/{g}')):>8}" for g in groups
        )
        lines.append(f"  {'best possible (ideal observer)':<{NAME}}{cells}")
    lines += ["", "  What each row means:"]
    for label, method, what in ROWS:
        row = rows.get(label)
        if row is None:
            continue
        lines.append(f"  - {label}: {what}. {_verdict(row, rows.get(REFERENCE), groups)}")
        if label != REFERENCE:
            lines.append(f"      config: method: {_flow(method)}")
    lines.append(
        "  † uses the sensitive attribute at test time: only for deployments that may read it."
    )
    lines.append(
        f"  {n_seeds} seeds on one data draw: an interval that spans 0 is a tie. "
        "docs/results.md holds the tables fixed in advance on new data draws."
    )
    return "\n".join(lines)


def _modality_lines(rows: Mapping[str, Any]) -> list[str]:
    """Each of erm's modality heads against the model of that modality alone (test AUC)."""
    reference = rows.get(REFERENCE)
    lines = [
        "  Are both modalities learnt? erm's modality heads vs a model of that modality alone:"
    ]
    learnt = True
    for m in MODALITIES:
        alone = rows.get(f"{m} only")
        if reference is None or alone is None:
            lines.append(f"    {m:<7} n/a (a run did not finish)")
            learnt = False
            continue
        head, solo = reference.mean.get(f"head_auc/{m}", math.nan), alone.mean.get("auc", math.nan)
        ok = abs(head - solo) <= HEAD_TOLERANCE
        learnt &= ok
        verdict = f"within {HEAD_TOLERANCE}" if ok else f"NOT within {HEAD_TOLERANCE}"
        lines.append(
            f"    {m:<7} head {_num(head)}  alone {_num(solo)}  ({head - solo:+.3f}, {verdict})"
        )
    lines.append(
        "    -> both are learnt: the minorities' lower AUCs come from how the model fuses them."
        if learnt
        else "    -> a modality lags its own model: the joint model under-learns it "
        "(give it its own loss, `unimodal_weight: 1`; docs/results.md)."
    )
    return lines


def _verdict(row: Any, reference: Any, groups: Sequence[str]) -> str:
    """One sentence from the numbers: the group gap for erm, the paired ES-AUC/AUC for others."""
    if reference is None:
        return ""
    if row is reference:
        aucs = {g: row.mean.get(f"auc/{g}", math.nan) for g in groups}
        worst, best = min(aucs, key=aucs.get), max(aucs, key=aucs.get)
        return (
            f"The gap: {worst} {_num(aucs[worst])} against {best} {_num(aucs[best])} "
            f"(ES-AUC {_num(row.mean.get('es_auc'))})."
        )
    es, auc = row.paired.get("es_auc"), row.paired.get("auc")
    if es is None or not math.isfinite(es.lo):
        return "Too few paired seeds for an interval."
    if es.lo > 0:
        what = f"Fairer: ES-AUC {es.mean:+.3f}, its interval above 0"
    elif es.hi < 0:
        what = f"Less fair: ES-AUC {es.mean:+.3f}, its interval below 0"
    else:
        what = f"Ties with erm on ES-AUC ({es.mean:+.3f}, interval spans 0)"
    if auc is not None and math.isfinite(auc.lo):
        if auc.lo > 0:
            what += f", at higher AUC ({auc.mean:+.3f})"
        elif auc.hi < 0:
            what += f", at lower AUC ({auc.mean:+.3f})"
        else:
            what += f", AUC unchanged within noise ({auc.mean:+.3f})"
    return what + "."


def _paired(p: Any) -> str:
    if p is None or not math.isfinite(p.mean):
        return "n/a"
    if not math.isfinite(p.lo):
        return f"{p.mean:+.3f}"
    return f"{p.mean:+.3f} [{p.lo:+.3f}, {p.hi:+.3f}]"


def _flow(method: Mapping[str, Any]) -> str:
    """A method block as a YAML flow map (`.inf` for infinity), ready to paste."""
    parts = []
    for key, value in method.items():
        text = ".inf" if value == math.inf else str(value)
        parts.append(f"{key}: {text}")
    return "{" + ", ".join(parts) + "}"


def _num(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.3f}"
