"""`multifair diagnose CONFIG [key=value ...]`: "do I need this?" on your own data.

Trains `erm` and one `unimodal` model per modality (x `--seeds`) with the config's own model
and training settings, each through `train(cfg)` into a normal run directory under
`OUT/runs/<label>/seed<s>`, then reports (a) modality imbalance, (b) group gaps against the
noise floor and (c) the method the results notes recommend, as ready config lines, a
benchmark config to confirm it (`OUT/confirm.yaml`) and `OUT/diagnosis.json`. The analysis
and its rules are in `multifair.evaluation.diagnose`; docs/diagnose.md explains them.

A finished run (complete metrics.json, same resolved config) is reused when the same command
runs again with the same --out, so an interrupted diagnosis resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from multifair.errors import UserError
from multifair.evaluation import diagnose as dg

CONFIRM_SEEDS = [0, 1, 2, 3, 4]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="do I need a balancing or fairness method? erm vs each modality alone, group gaps "
        "vs noise, a recommendation",
        description="Train erm and one single-modality model per modality on CONFIG's data "
        "(its own model and training settings; key=value overrides as for `train`), then "
        "report (a) modality imbalance: each erm auxiliary head against that modality alone, "
        "(b) group AUC gaps per attribute against the noise floor, (c) the method the results "
        "notes recommend for what was found, as config lines. Decisions use the validation "
        "split; the test split is shown alongside. Rules: docs/diagnose.md.",
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG [key=value ...]",
        help="a training config, then overrides",
    )
    p.add_argument(
        "--data",
        metavar="YAML",
        help="a file with a data section that replaces CONFIG's (e.g. a generated table.yaml)",
    )
    p.add_argument("--out", metavar="DIR", help="default: runs/diagnose-<timestamp>")
    p.add_argument(
        "--seeds", type=int, default=2, help="training seeds per model (default 2; more: tighter)"
    )
    p.add_argument("--epochs", type=int, help="training epochs (default: the config's)")
    p.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the diagnosis here")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------
# the runs


def _split_items(items: Sequence[str]) -> tuple[str, list[str]]:
    from multifair.training.cli import _split_items as split

    config, overrides = split(list(items))
    if config is None:
        raise UserError("give a training CONFIG file (e.g. configs/diabetes.yaml)")
    return config, overrides


def base_config(
    config: str, overrides: Sequence[str], data: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """CONFIG (+ --data) + overrides as raw mappings, without a method section (diagnose
    chooses the methods). Returns (the merged config, the overrides as a mapping)."""
    from multifair import config as _config

    raw = _config.load_yaml(config)
    given = _config.parse_overrides(overrides) if overrides else {}
    if "method" in given:
        raise UserError(
            "method.* overrides: diagnose trains erm and unimodal itself; give data, model "
            "and train settings only"
        )
    if data is not None:
        section = _config.load_yaml(data)
        raw["data"] = section["data"] if isinstance(section.get("data"), dict) else section
    raw = _config.deep_merge(raw, given)
    raw.pop("method", None)
    return raw, given


def modality_kinds(data: Any) -> dict[str, str]:
    """The modalities a resolved data section trains on, with their kinds (image, volume,
    text, tabular), before any data is read: an unknown name fails here, not after a run."""
    from multifair.data.subjects import select_modalities

    if data.kind == "table":
        names = list(data.columns) if data.modalities is None else list(data.modalities)
        unknown = [m for m in names if m not in data.columns]
        if unknown:
            raise UserError(f"data.modalities: {unknown} not in data.columns {list(data.columns)}")
        return {m: data.columns[m].kind for m in dict.fromkeys(names)}
    if data.kind == "fairvision":
        from multifair.data.fairvision import FORMAT
    else:
        from multifair.data.fairvlmed import FORMAT
    return {m: FORMAT.modalities[m][0] for m in select_modalities(data, FORMAT)}


def run_config(
    raw: dict[str, Any],
    method: dict[str, Any],
    seed: int,
    run_dir: Path,
    epochs: int | None,
    only: str | None = None,
) -> Any:
    """One run's resolved config: the user's settings, this method and seed, no per-epoch bars,
    predictions of the validation and test splits written (what the analysis reads). `only`:
    read that modality only (`data.modalities: [only]`) - a unimodal run on data with missing
    modalities, which then has the patients that have it (one lacking every modality read is
    dropped by `data.missing_modalities: mask`)."""
    from multifair import config as _config
    from multifair.training.config import resolve_run_config

    predictions = raw.get("output", {}).get("predictions", ["train", "val", "test"])
    train: dict[str, Any] = {"seed": seed, "progress": False}
    if epochs is not None:
        train["epochs"] = epochs
    layer: dict[str, Any] = {
        "method": method,
        "train": train,
        "output": {
            "dir": str(run_dir),
            "predictions": list(dict.fromkeys([*predictions, "val", "test"])),
        },
    }
    if only is not None:
        layer["data"] = {"modalities": [only]}
    return resolve_run_config(base=_config.deep_merge(raw, layer))


def lacks_modalities(run_dir: Path) -> bool:
    """Whether a finished run's data has missing modalities (`present_*` prediction columns)."""
    from multifair.csvcheck import PRESENT_PREFIX

    path = run_dir / "predictions_val.csv"
    with path.open(encoding="utf-8") as stream:
        header = stream.readline().strip().split(",")
    return any(c.startswith(PRESENT_PREFIX) for c in header)


def plan(modalities: Sequence[str], seeds: int) -> list[tuple[str, dict[str, Any], int]]:
    """(label, method block, seed) of every run, seed-major so a stopped diagnosis has whole
    seeds. One modality: nothing to compare it with, so erm only."""
    methods = [("erm", {"name": "erm"})]
    if len(modalities) > 1:
        methods += [(f"unimodal_{m}", {"name": "unimodal", "modality": m}) for m in modalities]
    return [(label, block, s) for s in range(seeds) for label, block in methods]


def _finished(run_dir: Path, cfg: Any) -> bool:
    """A complete earlier run of the same resolved config (else its directory is cleared)."""
    from multifair.evaluation.benchmark import read_metrics
    from multifair.training import run
    from multifair.training.config import to_dict

    if not run_dir.exists():
        return False
    if read_metrics(run_dir) is not None:
        if run.read_config(run_dir) != to_dict(cfg):
            raise UserError(f"{run_dir} was trained with a different config; use another --out")
        return True
    shutil.rmtree(run_dir)  # unfinished: start it again
    return False


def train_runs(
    raw: dict[str, Any],
    runs: Sequence[tuple[str, dict[str, Any], int]],
    out: Path,
    epochs: int | None,
) -> dict[tuple[str, int], Path]:
    """Train (or reuse) every run; one progress bar over runs, or one line per run when stdout
    is not a terminal. Each run's own output goes to OUT/logs/<label>_seed<s>.txt."""
    from tqdm import tqdm

    from multifair.training.trainer import train

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, int], Path] = {}
    tty = sys.stdout.isatty()
    bar = tqdm(total=len(runs), desc="diagnose", unit="run", disable=not tty, dynamic_ncols=True)
    for i, (label, method, seed) in enumerate(runs, 1):
        run_dir = out / "runs" / label / f"seed{seed}"
        # data with missing modalities (seen in erm's predictions: erm runs first in a seed):
        # a unimodal model cannot mask its only modality, so it reads that modality's patients
        only = None
        if method["name"] == "unimodal" and lacks_modalities(done[("erm", seed)]):
            only = method["modality"]
        cfg = run_config(raw, method, seed, run_dir, epochs, only)
        bar.set_postfix_str(f"{label} seed {seed}")
        t0 = time.perf_counter()
        reused = _finished(run_dir, cfg)
        if not reused:
            log = logs / f"{label}_seed{seed}.txt"
            with log.open("w", encoding="utf-8") as stream, contextlib.redirect_stdout(stream):
                train(cfg)
        done[(label, seed)] = run_dir
        bar.update()
        if not tty:
            what = "reused" if reused else f"{time.perf_counter() - t0:.1f} s"
            print(f"[{i}/{len(runs)}] {label} seed {seed}: {what}", flush=True)
    bar.close()
    return done


# ---------------------------------------------------------------------------------------
# reading the predictions


def read_scores(
    runs: dict[tuple[str, int], Path],
    modalities: Sequence[str],
    seeds: int,
    split: str,
    classes: Sequence[str] | None = None,
) -> dg.SplitScores:
    """The split's predictions of every run, aligned by sample_id to erm seed 0's order.
    `classes` (a K-class label): the `score_<class>` and `aux_score_<modality>_<class>`
    columns in class order, as (S, n, K) scores."""
    import pandas as pd

    from multifair.csvcheck import AUX_SCORE_PREFIX, PRESENT_PREFIX, SCORE_PREFIX

    def columns(table: pd.DataFrame, binary: str, prefix: str) -> np.ndarray:
        """(n,) the binary score column, or (n, K) the per-class columns `prefix<class>`."""
        if classes is None:
            return table[binary].to_numpy(float)
        names = [f"{prefix}{c}" for c in classes]
        absent = [c for c in names if c not in table.columns]
        if absent:
            raise UserError(f"predictions_{split}.csv: no column(s) {absent}")
        return table[names].to_numpy(float)

    def frame(label: str, seed: int) -> pd.DataFrame:
        path = runs[(label, seed)] / f"predictions_{split}.csv"
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
        return table.set_index(table["sample_id"].astype(str))

    first = frame("erm", 0)
    order = first.index
    # `<attribute>, <attribute>_name` pairs (a K-class label's `label_name` is not one)
    attributes = [c for c in first.columns if f"{c}_name" in first.columns and c != "label"]

    present = {
        c[len(PRESENT_PREFIX) :]: first[c].to_numpy(np.int64) == 1
        for c in first.columns
        if c.startswith(PRESENT_PREFIX)
    }

    def aligned(label: str, seed: int, have: np.ndarray | None = None) -> pd.DataFrame:
        """`have`: the patients the run predicts (a unimodal run on data with missing
        modalities: those with its modality); the others get NaN scores."""
        table = frame(label, seed)
        expected = set(order if have is None else order[have])
        if set(table.index) != expected:
            raise UserError(f"{runs[(label, seed)]}: predictions_{split}.csv has other patients")
        return table.reindex(order)

    erm = [aligned("erm", s) for s in range(seeds)]
    heads, alone = {}, {}
    if len(modalities) > 1:
        for m in modalities:
            aux = f"{AUX_SCORE_PREFIX}{m}"
            heads[m] = np.stack([columns(t, aux, f"{aux}_") for t in erm])
            have = present.get(m)
            alone[m] = np.stack(
                [
                    columns(aligned(f"unimodal_{m}", s, have), "score", SCORE_PREFIX)
                    for s in range(seeds)
                ]
            )
    return dg.SplitScores(
        y=first["label"].to_numpy(np.int64),
        attributes={a: first[a].to_numpy(np.int64) for a in attributes},
        group_names={
            a: {int(c): str(n) for c, n in zip(first[a], first[f"{a}_name"])} for a in attributes
        },
        fused=np.stack([columns(t, "score", SCORE_PREFIX) for t in erm]),
        heads=heads,
        alone=alone,
        present=present,
    )


# ---------------------------------------------------------------------------------------
# the confirmation commands


def confirm_config(
    rec: dg.Recommendation,
    config: str,
    given: dict[str, Any],
    data: str | None,
    modalities: Sequence[str],
    train_attribute: str,
    out: Path,
    epochs: int | None,
    missing: bool = False,
) -> dict[str, Any]:
    """A `multifair benchmark` config: erm against the recommendation on the user's data, 5
    paired seeds, with the single-modality rows as reference lines - except on data with
    missing modalities (`missing`), where a single-modality model predicts only the patients
    that have its modality, not the split the other rows are compared on."""
    overrides = dict(given)
    if epochs is not None:
        overrides = {**overrides, "train": {**overrides.get("train", {}), "epochs": epochs}}
    methods: list[dict[str, Any]] = [{"label": "erm", "method": {"name": "erm"}}]
    for _, block in rec.lines:
        if block is not None:
            methods.append({"label": dg.label(block), "method": dict(block)})
    if len(modalities) > 1 and not missing:
        methods += [
            {"label": f"{m} only", "method": {"name": "unimodal", "modality": m}}
            for m in modalities
        ]
    cfg: dict[str, Any] = {
        "name": f"{out.name}-confirm",
        "base": str(Path(config).resolve()),
        "output": str((out / "confirm").resolve()),
        "overrides": overrides,
        "attributes": [rec.attribute or train_attribute],
        "seeds": CONFIRM_SEEDS,
        "reference": "erm",
        "workers": 1,
        "methods": methods,
    }
    if data is not None:
        cfg["datasets"] = [{"label": "data", "data_config": str(Path(data).resolve())}]
    return cfg


def _shell(text: str) -> str:
    return text if all(c.isalnum() or c in "._-/=+:" for c in text) else f"'{text}'"


def commands(
    rec: dg.Recommendation,
    config: str,
    overrides: Sequence[str],
    data: str | None,
    train_attribute: str,
    confirm: Path | None,
) -> list[str]:
    """The commands to confirm the recommendation on the user's data, then to train it."""
    lines = []
    if confirm is not None:
        lines.append(f"confirm it (erm against it, {len(CONFIRM_SEEDS)} paired seeds):")
        lines.append(f"  multifair benchmark {confirm}")
    words = ["multifair", "train", config, *overrides]
    if rec.attribute is not None and rec.attribute != train_attribute:
        words.append(f"data.attribute={rec.attribute}")
    lines.append(
        "train it" + (f" (first copy the data section of {data} into CONFIG):" if data else ":")
    )
    for _, block in rec.lines:
        method = "method.name=erm" if block is None else f"method={dg.flow(block)}"
        lines.append("  " + " ".join(_shell(w) for w in [*words, method]))
    lines.append("more: docs/results.md (Summary), docs/diagnose.md")
    return lines


# ---------------------------------------------------------------------------------------
# the command


def run(args: argparse.Namespace) -> int:
    from multifair.training.logging import dump_json

    config, overrides = _split_items(args.items)
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: give at least 1")
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: give at least 1")
    if args.n_boot < 100:
        raise UserError(f"--n-boot {args.n_boot}: give at least 100 for a 95% interval")
    raw, given = base_config(config, overrides, args.data)
    out = Path(args.out or f"runs/diagnose-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    # validate everything before the first run: the config, the modalities
    probe = run_config(raw, {"name": "erm"}, 0, out / "runs" / "erm" / "seed0", args.epochs)
    # a K-class label (K > 2): macro one-vs-rest AUCs, and only methods that train K classes;
    # two named classes predict one positive-class score, as a 0/1 label does
    spec = probe.data.class_spec()
    classes = None if spec is None or len(spec.names) <= 2 else list(spec.names)
    kinds = modality_kinds(probe.data)
    modalities = list(kinds)
    train_attribute = probe.data.attribute
    runs = plan(modalities, args.seeds)
    print(
        f"diagnose {config}: {probe.data.kind} data, modalities {', '.join(modalities)}; "
        f"{len(runs)} runs (erm{''.join(f', {m} alone' for m in modalities if len(modalities) > 1)}"
        f" x {args.seeds} seed{'s' if args.seeds > 1 else ''}, {probe.train.epochs} epochs) "
        f"-> {out}",
        flush=True,
    )
    t0 = time.perf_counter()
    trained = train_runs(raw, runs, out, args.epochs)
    splits = {
        split: dg.diagnose_split(
            read_scores(trained, modalities, args.seeds, split, classes), n_boot=args.n_boot
        )
        for split in ("val", "test")
    }
    rec = dg.recommend(
        splits["val"]["modalities"],
        splits["val"]["groups"],
        train_attribute=train_attribute,
        image_encoders=any(k in ("image", "volume") for k in kinds.values()),
        missing=splits["val"]["missing"],
        n_classes=2 if classes is None else len(classes),
    )
    confirm = None
    if rec.kind != "none":
        confirm = out / "confirm.yaml"
        cfg = confirm_config(
            rec,
            config,
            given,
            args.data,
            modalities,
            train_attribute,
            out,
            args.epochs,
            missing=bool(splits["val"]["missing"]),
        )
        confirm.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), "utf-8")
    diagnosis = {
        "config": config,
        "overrides": list(overrides),
        "data": args.data,
        "kind": probe.data.kind,
        "modalities": kinds,
        **({} if classes is None else {"classes": classes}),  # K-class: macro one-vs-rest AUCs
        "train_attribute": train_attribute,
        "seeds": args.seeds,
        "epochs": probe.train.epochs,
        "rules": {
            "min_effect": dg.MIN_EFFECT,
            "alpha": dg.ALPHA,
            "min_class": dg.MIN_CLASS,
            "n_perm": dg.N_PERM,
            "n_boot": args.n_boot,
            "decided_on": "val",
        },
        "runs": {f"{label}/seed{seed}": str(path) for (label, seed), path in trained.items()},
        "splits": splits,
        "recommendation": {
            "kind": rec.kind,
            "lines": [
                [what, f"method: {dg.flow(block or {'name': 'erm'})}"] for what, block in rec.lines
            ],
            "why": rec.why,
            "attribute": rec.attribute,
        },
        "commands": commands(rec, config, overrides, args.data, train_attribute, confirm),
        "seconds": time.perf_counter() - t0,
    }
    print()
    print(dg.format_report(diagnosis))
    dump_json(diagnosis, out / "diagnosis.json")
    if args.json:
        dump_json(diagnosis, args.json)
    print(f"\ndiagnosis: {out / 'diagnosis.json'} ({diagnosis['seconds']:.0f} s)")
    return 0
