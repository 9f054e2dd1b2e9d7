"""Synthetic data in the real on-disk formats, with knobs that make the science visible.

`generate(SynthKnobs(...), out)` writes a FairVision tree (fundus + OCT npz per subject), a
FairVLMed tree (fundus + note npz per subject, CSV summaries) or a table (CSV + data config),
plus `synth_meta.json`: the knobs, every sample's latent signals, and the best achievable
per-group AUC computed from the latents.

How the label reaches the pixels (per sample, per modality m, group g = race):
    s_m = (2y - 1) * d[m][g] / 2 + N(0, 1)        (d = the knob `signal`, a d' per group)
so modality m alone separates group g at AUC Phi(d[m][g] / sqrt 2), all modalities together
(independent given y) at Phi(sqrt(sum_m d[m][g]^2) / sqrt 2). The renderers then write s_m
in a form that is easy or hard for a network:
- the EASY modality (fundus / table group "A") shows s_m as brightness: the optic disc's
  intensity (or, in `minority_pattern`, the macula's darkness for minority groups) - linear
  in the pixels; table "A" columns are noisy linear projections of s_m;
- the HARD modality (OCT / note / table group "B") shows s_m as a pattern with no mean shift:
  OCT slices carry streak texture whose orientation follows s_m (horizontal vs vertical
  spatial correlation); notes list findings whose direction words ("increased", "reduced")
  are bad or good depending on the finding (an XOR of finding and direction); table "B" has
  column triples whose product's sign follows s_m (a 3-way XOR of signs).
Multi-class (`n_classes` K > 2): y is an ordered stage 0..K-1 drawn uniformly, and
    s_m = (y - (K - 1) / 2) * d[m][g] + N(0, 1)
(for K = 2 this is the binary formula), so d' separates ADJACENT stages. The table writes the
stage names of `CLASS_NAMES` in a `stage` column; FairVision writes AMD-style raw strings in
`amd_condition` (K = 4, the `fairvision_amd` preset) or the class names (other K). The best
achievable AUC is then the macro one-vs-rest AUC of the Bayes posterior given the latents.
Scenarios: `main` (easy modality strong for the majority, weak for minorities; hard modality
moderate for all), `neutral` (no group effect), `minority_pattern` (minorities' easy-modality
signal in a different place than the majority's).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from multifair.console import bars_enabled
from multifair.data.formats import GROUP_NAMES, LEGACY_RACE
from multifair.errors import UserError

Flavour = Literal["fairvision", "fairvlmed", "table"]
Scenario = Literal["main", "neutral", "minority_pattern"]

MODALITIES: dict[str, tuple[str, str]] = {  # flavour -> (easy, hard)
    "fairvision": ("fundus", "oct"),
    "fairvlmed": ("fundus", "note"),
    "table": ("A", "B"),
}
# d' per race group (Asian, Black, White) for (easy, hard), per scenario
SCENARIO_SIGNAL: dict[str, tuple[list[float], list[float]]] = {
    "main": ([0.7, 0.7, 2.6], [1.2, 1.2, 1.2]),
    "neutral": ([2.6, 2.6, 2.6], [1.2, 1.2, 1.2]),
    "minority_pattern": ([2.0, 2.0, 2.6], [1.2, 1.2, 1.2]),
}
MAJORITY = 2  # White
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "fairvision": {
        "small": {"n": 1500, "fundus": (64, 64), "oct": (16, 64, 64)},
        "full": {"n": 10000, "fundus": (200, 200), "oct": (200, 200, 200)},
    },
    "fairvlmed": {
        "small": {"n": 1500, "fundus": (80, 64)},
        "full": {"n": 10000, "fundus": (664, 512)},
    },
    "table": {"small": {"n": 3000}, "full": {"n": 10000}},
}
SPLIT_FRACTIONS = {
    "fairvision": (0.6, 0.1, 0.3),
    "fairvlmed": (0.7, 0.1, 0.2),
    "table": (0.6, 0.2, 0.2),
}
LAYOUTS = ("readme", "renamed", "dataset")


class SynthKnobs(BaseModel):
    """Everything that shapes a synthetic dataset (written to synth_meta.json)."""

    model_config = ConfigDict(extra="forbid")

    flavour: Flavour
    size: Literal["small", "full"] = "small"
    scenario: Scenario = "main"
    seed: int = 0
    n: int | None = Field(None, ge=20)
    group_mix: list[float] = Field(
        default_factory=lambda: [0.10, 0.15, 0.75]
    )  # Asian, Black, White
    pos_rate: float = Field(0.5, gt=0, lt=1)
    signal: dict[str, list[float]] = Field(default_factory=dict)  # modality -> d' per race group
    unknown_rate: float = Field(0.05, ge=0, le=1)  # ethnicity, language, maritalstatus
    race_unknown_rate: float = Field(0.0, ge=0, le=1)
    degenerate: str | None = None  # "ATTR=CODE": that group gets label 0 only
    fundus_dtype: Literal["uint8", "float32", "float64"] = "uint8"
    race_codes: Literal["int", "legacy"] = "int"
    layout: Literal["readme", "renamed", "dataset"] = "readme"  # fairvision folder layout
    test_name: str | None = None  # Test / Testing / test (default: the layout's)
    split: list[float] | None = None  # train, val, test fractions
    compress: bool = False
    csv_bom: bool = False
    slo_jpg: bool = False  # fairvision: write slo_xxxxx.jpg beside each npz (ignored by loaders)
    empty_note_rate: float = Field(0.01, ge=0, le=1)
    table_order: Literal[2, 3] = 3  # table B: XOR over column pairs (easier) or triples
    oct_region: Literal["band", "slice"] = "band"  # where the OCT texture carries the signal
    oct_tilt: float = Field(0.45, gt=0, le=0.78)  # max texture tilt (radians) away from 45 deg
    fundus_shape: list[int] | None = None  # (H, W)
    n_classes: int = Field(2, ge=2, le=6)  # > 2: a multi-class (ordered stage) label
    oct_shape: list[int] | None = None  # (D, H, W)
    # modality -> the share of samples that LACK it: one rate, or three (Asian, Black, White)
    # for missingness that differs by group. Written so the files really lack it: a table's
    # block all empty, an npz without the array, an empty note. A sample never loses every
    # modality (it then keeps the one its group misses least).
    missing: dict[str, list[float]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SynthKnobs:
        if len(self.group_mix) != 3 or min(self.group_mix) < 0 or sum(self.group_mix) <= 0:
            raise ValueError("group_mix needs three non-negative shares (Asian, Black, White)")
        names = MODALITIES[self.flavour]
        for m, values in self.signal.items():
            if m not in names:
                raise ValueError(f"signal: {m!r} is not a {self.flavour} modality {list(names)}")
            if len(values) not in (1, 3):
                raise ValueError(f"signal.{m}: give one value or three (Asian, Black, White)")
        for m, rates in self.missing.items():
            if m not in names:
                raise ValueError(f"missing: {m!r} is not a {self.flavour} modality {list(names)}")
            if len(rates) not in (1, 3) or not all(0 <= r <= 1 for r in rates):
                raise ValueError(f"missing.{m}: one rate or three (Asian, Black, White) in [0, 1]")
        if self.n_classes > 2 and self.flavour == "fairvlmed":
            raise ValueError(
                "n_classes: FairVLMed has a binary glaucoma label only; multi-class labels are "
                "written for the fairvision (amd_condition) and table flavours"
            )
        if self.split is not None and (len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-6):
            raise ValueError("split: three fractions (train, val, test) summing to 1")
        if self.degenerate is not None:
            attr, _, code = self.degenerate.partition("=")
            if (
                attr not in GROUP_NAMES
                or not code.lstrip("-").isdigit()
                or int(code) not in GROUP_NAMES[attr]
            ):
                raise ValueError(
                    f"degenerate: {self.degenerate!r} is not ATTR=CODE (e.g. language=2)"
                )
        if self.fundus_shape is not None and (
            len(self.fundus_shape) != 2 or min(self.fundus_shape) < 8
        ):
            raise ValueError("fundus_shape: (H, W), each >= 8")
        if self.oct_shape is not None and (len(self.oct_shape) != 3 or min(self.oct_shape) < 2):
            raise ValueError("oct_shape: (D, H, W)")
        return self

    def strengths(self) -> dict[str, np.ndarray]:
        """d' per modality per race group (3,)."""
        easy, hard = MODALITIES[self.flavour]
        base = dict(zip((easy, hard), SCENARIO_SIGNAL[self.scenario]))
        out = {}
        for m in (easy, hard):
            values = self.signal.get(m, base[m])
            out[m] = np.asarray(values * 3 if len(values) == 1 else values, dtype=np.float64)
        return out


# ---- latents ----------------------------------------------------------------------------------
def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def draw_population(k: SynthKnobs, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Labels, attributes, splits and latent signals for n subjects."""
    mix = np.asarray(k.group_mix) / sum(k.group_mix)
    race = rng.choice(3, size=n, p=mix)
    gender = rng.integers(0, 2, size=n)
    hispanic = (rng.random(n) < 0.06).astype(np.int64)
    language = np.where(
        hispanic == 1,
        rng.choice(3, size=n, p=[0.2, 0.75, 0.05]),
        rng.choice(3, size=n, p=[0.93, 0.01, 0.06]),
    )
    marital = rng.choice(5, size=n, p=[0.55, 0.2, 0.12, 0.1, 0.03])
    age = np.clip(rng.normal(62, 12, size=n), 20, 95).round(1)
    if k.n_classes == 2:
        label = (rng.random(n) < k.pos_rate).astype(np.int64)
    else:
        label = rng.integers(0, k.n_classes, size=n).astype(np.int64)
    attrs = {
        "race": race,
        "gender": gender,
        "ethnicity": hispanic,
        "language": language,
        "maritalstatus": marital,
    }
    if k.degenerate:
        attr, _, code = k.degenerate.partition("=")
        label[attrs[attr] == int(code)] = 0
    for a in ("ethnicity", "language", "maritalstatus"):
        attrs[a] = np.where(rng.random(n) < k.unknown_rate, -1, attrs[a])
    race_obs = np.where(rng.random(n) < k.race_unknown_rate, -1, race)
    # split stratified by (label, race) so small val/test splits keep every group's balance
    fractions = k.split or SPLIT_FRACTIONS[k.flavour]
    split = np.empty(n, dtype=object)
    for stratum in range(3 * k.n_classes):
        rows = np.flatnonzero(label * 3 + race == stratum)
        rows = rows[rng.permutation(len(rows))]
        cuts = np.round(np.cumsum(fractions) * len(rows)).astype(int)
        split[rows[: cuts[0]]] = "train"
        split[rows[cuts[0] : cuts[1]]] = "val"
        split[rows[cuts[1] :]] = "test"
    latents = {}
    for m, d in k.strengths().items():
        if k.n_classes == 2:
            latents[m] = (2 * label - 1) * d[race] / 2 + rng.standard_normal(n)
        else:
            latents[m] = (label - (k.n_classes - 1) / 2) * d[race] + rng.standard_normal(n)
    return {
        "label": label,
        "attrs": attrs,
        "race_true": race,
        "race_obs": race_obs,
        "age": age,
        "split": split,
        "latents": latents,
    }


# class names of a K-class synthetic label (table `stage` column, FairVision for K != 4)
CLASS_NAMES: dict[int, list[str]] = {
    3: ["none", "moderate", "severe"],
    4: ["normal", "early", "intermediate", "late"],
    5: ["s0", "s1", "s2", "s3", "s4"],
    6: ["s0", "s1", "s2", "s3", "s4", "s5"],
}


def posterior(
    latents: dict[str, np.ndarray], strengths: dict[str, np.ndarray], race: np.ndarray, k: int
) -> np.ndarray:
    """(n, K) Bayes posterior of the stage given the latents of the modalities in `latents`
    (independent given y; uniform prior): the best any model can score multi-class."""
    mu = np.arange(k) - (k - 1) / 2  # (K,)
    loglik = np.zeros((len(race), k))
    for m, s in latents.items():
        loglik += -0.5 * (s[:, None] - mu[None, :] * strengths[m][race][:, None]) ** 2
    loglik -= loglik.max(axis=1, keepdims=True)
    p = np.exp(loglik)
    return p / p.sum(axis=1, keepdims=True)


def _best_macro_table(k: SynthKnobs, pop: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """`best_auc_table` for K > 2: macro one-vs-rest AUC of the posterior, per race group."""
    from sklearn.metrics import roc_auc_score

    strengths = k.strengths()
    race = pop["race_true"][rows]
    y = pop["label"][rows]
    lat = {m: pop["latents"][m][rows] for m in strengths}

    def macro(sel: np.ndarray, mods: Sequence[str]) -> float | None:
        if sel.sum() == 0 or len(np.unique(y[sel])) < k.n_classes:
            return None
        p = posterior({m: lat[m][sel] for m in mods}, strengths, race[sel], k.n_classes)
        return round(float(roc_auc_score(y[sel], p, multi_class="ovr")), 4)

    out: dict[str, Any] = {}
    for code, name in GROUP_NAMES["race"].items():
        sel = race == code
        entry: dict[str, Any] = {"n": int(sel.sum())}
        for m in strengths:
            entry[m] = macro(sel, [m])
        entry["joint"] = macro(sel, list(strengths))
        out[name] = entry
    out["overall_joint"] = macro(np.ones(len(rows), dtype=bool), list(strengths))
    return out


def best_auc_table(k: SynthKnobs, pop: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """Best achievable AUC per race group from the latents: theory (Phi) and on these samples."""
    from sklearn.metrics import roc_auc_score

    if k.n_classes > 2:
        return _best_macro_table(k, pop, rows)

    strengths = k.strengths()
    race = pop["race_true"][rows]
    y = pop["label"][rows]
    out: dict[str, Any] = {}
    combined = sum(strengths[m][race] * pop["latents"][m][rows] for m in strengths)
    for code, name in GROUP_NAMES["race"].items():
        sel = race == code
        entry: dict[str, Any] = {"n": int(sel.sum()), "positives": int(y[sel].sum())}
        for m in strengths:
            entry[f"{m}_theory"] = round(_phi(strengths[m][code] / math.sqrt(2)), 4)
        joint = math.sqrt(sum(strengths[m][code] ** 2 for m in strengths))
        entry["joint_theory"] = round(_phi(joint / math.sqrt(2)), 4)
        both = sel.sum() > 0 and 0 < y[sel].sum() < sel.sum()
        for m in strengths:
            entry[m] = (
                round(float(roc_auc_score(y[sel], pop["latents"][m][rows][sel])), 4)
                if both
                else None
            )
        entry["joint"] = round(float(roc_auc_score(y[sel], combined[sel])), 4) if both else None
        out[name] = entry
    if 0 < y.sum() < len(y):
        out["overall_joint"] = round(float(roc_auc_score(y, combined)), 4)
    return out


# ---- renderers ---------------------------------------------------------------------------------
def _box_smooth(x: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Moving average of `length` along `axis` (wrap-free, same size), via cumulative sums."""
    x = np.moveaxis(x, axis, -1)
    pad = length // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, length - 1 - pad)], mode="reflect")
    c = np.cumsum(padded, axis=-1, dtype=np.float32)
    c = np.concatenate([np.zeros((*c.shape[:-1], 1), np.float32), c], axis=-1)
    out = (c[..., length:] - c[..., :-length]) / length
    return np.moveaxis(out, -1, axis)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.meshgrid(
        np.linspace(0, 1, h, dtype=np.float32),
        np.linspace(0, 1, w, dtype=np.float32),
        indexing="ij",
    )
    return yy, xx


DISC = (0.5, 0.68, 0.09)  # (y, x, radius) as fractions
MACULA = (0.5, 0.32, 0.11)


def _blob(yy: np.ndarray, xx: np.ndarray, spot: tuple[float, float, float]) -> np.ndarray:
    cy, cx, r = spot
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32)


def render_fundus(
    shape: Sequence[int], s: float, alt_pattern: bool, rng: np.random.Generator
) -> np.ndarray:
    """A grayscale fundus (H, W) float32 in 0..255 whose disc brightness follows s (or, with
    `alt_pattern`, whose macula darkness follows s and the disc is uninformative)."""
    h, w = shape
    yy, xx = _grid(h, w)
    img = 60 + 70 * np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / (2 * 0.32**2))
    low = rng.standard_normal((6, 6)).astype(np.float32)
    iy = np.clip((yy * 5).astype(int), 0, 5)
    ix = np.clip((xx * 5).astype(int), 0, 5)
    img += 6 * _box_smooth(_box_smooth(low[iy, ix], 0, max(3, h // 6)), 1, max(3, w // 6))
    filler = float(rng.standard_normal())  # the uninformative spot gets a signal-free draw
    disc, macula = (filler, s) if alt_pattern else (s, filler)
    img += (70 + 14 * disc) * _blob(yy, xx, DISC)
    img -= (30 + 12 * macula) * _blob(yy, xx, MACULA)
    img += rng.normal(0, 5)  # exposure
    img += rng.normal(0, 3, size=(h, w)).astype(np.float32)
    return np.clip(img, 0, 255)


def fundus_statistic(img: np.ndarray, alt_pattern: bool) -> float:
    """Ideal-observer statistic for `render_fundus`: spot contrast against a ring around it."""
    h, w = img.shape
    yy, xx = _grid(h, w)
    cy, cx, r = MACULA if alt_pattern else DISC
    dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    inner = img[dist < r].mean()
    ring = img[(dist > 2.5 * r) & (dist < 3.5 * r)].mean()
    return float(ring - inner) if alt_pattern else float(inner - ring)


OCT_TILT = 0.45  # default max tilt away from 45 degrees (radians)
OCT_TEXTURE = 25.0  # texture amplitude in gray levels


def oct_angle(s: float, tilt: float = OCT_TILT) -> float:
    """Texture orientation: 0 = horizontal streaks, pi/2 = vertical; pi/4 at s = 0."""
    return math.pi / 4 + tilt * math.tanh(s / 1.5)


def render_oct(
    shape: Sequence[int],
    s: float,
    rng: np.random.Generator,
    region: str = "band",
    tilt: float = OCT_TILT,
) -> np.ndarray:
    """An OCT volume (D, H, W) uint8: a bright, wavy retina band whose streak texture is
    oriented by s (RNFL-like: the signal lives only inside the band); the texture outside
    is isotropic. Mean and variance are the same for every s - no mean shift.

    `region="slice"` orients the texture over the whole slice instead (more signal per pixel:
    for models that read small slices). Tuned by prototyping (docs/data.md): at 64 px and 10
    slices a small per-slice CNN learns the default alone in 3-4 epochs; the whole slice
    textured was learnt in 10 steps (too easy to lag), the band with tilt 0.3 barely at all.
    At 32 px and 4 slices the band is not learnable; `region="slice", tilt=0.3` is."""
    d, h, w = shape
    theta = oct_angle(s, tilt)
    length = max(3, w // 10)
    horiz = _box_smooth(rng.standard_normal((d, h, w), dtype=np.float32), 2, length)
    vert = _box_smooth(rng.standard_normal((d, h, w), dtype=np.float32), 1, length)
    horiz *= math.sqrt(length)  # unit variance again
    vert *= math.sqrt(length)
    yy, xx = _grid(h, w)
    centre = 0.45 + 0.05 * np.sin(2 * np.pi * xx + rng.uniform(0, 2 * np.pi))
    profile = np.exp(-((yy - centre) ** 2) / (2 * 0.08**2))  # (H, W)
    inside = (profile > 0.3).astype(np.float32) if region == "band" else np.ones_like(profile)
    oriented = math.cos(theta) * horiz + math.sin(theta) * vert
    isotropic = (horiz + vert) / math.sqrt(2)
    texture = inside * oriented + (1 - inside) * isotropic
    vol = (50 + 70 * profile)[None] + OCT_TEXTURE * texture
    vol += rng.normal(0, 2, size=vol.shape).astype(np.float32)
    return np.clip(vol, 0, 255).round().astype(np.uint8)


def oct_statistic(vol: np.ndarray) -> float:
    """Ideal-observer statistic for `render_oct`: log ratio of W- to H-gradient energy."""
    v = vol.astype(np.float32)
    dw = np.mean(np.diff(v, axis=2) ** 2)
    dh = np.mean(np.diff(v, axis=1) ** 2)
    return float(np.log(dw + 1e-6) - np.log(dh + 1e-6))


# (finding, direction that is bad: +1 increased, -1 decreased, short name for the summary)
FINDINGS = [
    ("intraocular pressure", +1, "iop"),
    ("cup-to-disc ratio", +1, "c/d"),
    ("neuroretinal rim thickness", -1, "rim"),
    ("rnfl thickness", -1, "rnfl"),
]
FILLER = (
    "no acute distress.",
    "eye drops reviewed with the patient.",
    "return to clinic in six months.",
    "anterior segment unremarkable.",
    "patient reports no new symptoms.",
    "medications reconciled.",
)


def bad_count(s: float) -> int:
    """How many of a note's four findings are written in their bad direction."""
    return int(np.clip(round(2 + 0.87 * s), 0, len(FINDINGS)))


def render_note(s: float, age: float, gender: int, rng: np.random.Generator) -> tuple[str, str]:
    """(note, summary <= 180 chars): the four findings in random order, "<finding>
    increased|decreased", `bad_count(s)` of them in their bad direction.

    Two findings are bad when increased, two when decreased, so every finding name and both
    direction words are equally frequent in both classes: only the (finding, direction)
    pairing carries the label - a unigram bag of words sees nothing, word pairs do. Tuned by
    prototyping (docs/data.md): six findings per note with synonyms, varied word order and
    filler were learnt neither by bigrams nor by MiniLM (frozen, or fine-tuned two epochs)
    from 1,000 notes; four fixed short findings are learnt by bigrams (AUC ~0.8) and by
    frozen MiniLM + MLP (~0.75)."""
    n_bad = bad_count(s)
    chosen = rng.permutation(len(FINDINGS)).tolist()
    bad = set(rng.permutation(len(FINDINGS))[:n_bad].tolist())
    who = "woman" if gender == 0 else "man"
    parts = [f"{int(age)} year old {who} seen for glaucoma follow up."]
    short = []
    for i in chosen:
        name, bad_dir, abbrev = FINDINGS[i]
        up = (bad_dir > 0) == (i in bad)
        parts.append(f"{name} {'increased' if up else 'decreased'}.")
        short.append(f"{abbrev} {'up' if up else 'down'}")
    if rng.random() < 0.3:
        parts.append(str(rng.choice(FILLER)))
    summary = f"{int(age)}yo {who}, glaucoma f/u: " + ", ".join(short) + "."
    return " ".join(parts).capitalize(), summary[:180]


def note_statistic(note: str) -> float:
    """Ideal observer for `render_note`: the number of findings written in their bad direction."""
    text = note.lower()
    return float(
        sum(
            f"{name} {'increased' if bad_dir > 0 else 'decreased'}" in text
            for name, bad_dir, _ in FINDINGS
        )
    )


# table: 10 "A" columns (majority pattern, minority pattern) and 12 "B" columns
N_A, N_B = 10, 12


def render_table_row(
    s_a: float,
    s_b: float,
    alt_pattern: bool,
    rng: np.random.Generator,
    loadings: np.ndarray,
    order: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """A (10,): linear in s_a (majority: columns 1-5; minority pattern: columns 6-10).
    B (12,): groups of `order` columns (12 / order groups) whose sign product is sign(s_b) -
    an XOR of signs: every smaller set of columns is free of the label; magnitudes grow with
    |s_b|.

    Tuned by prototyping (docs/data.md): with PAIRS (order 2) a small MLP learns B within an
    epoch, alone or jointly, so joint training hardly lags; with TRIPLES (order 3, the
    default) B alone is learnt over 10-20 epochs and lags behind A in joint training."""
    w = loadings[1] if alt_pattern else loadings[0]
    a = w * s_a + rng.normal(0, 0.6, size=N_A)
    # the uninformative half of A carries a signal-free draw on the other loadings
    a += (loadings[0] if alt_pattern else loadings[1]) * rng.standard_normal()
    k = N_B // order
    t = s_b + rng.normal(0, 0.25, size=k)
    signs = rng.choice([-1.0, 1.0], size=(k, order - 1))
    last = np.prod(signs, axis=1) * np.sign(t)
    cols = np.concatenate([signs, last[:, None]], axis=1)  # (k, order), product = sign(t)
    mag = np.abs(t)[:, None] ** (1 / order) + 0.3
    skew = np.exp(rng.normal(0, 0.3, size=(k, order)))
    return a, (cols * mag * skew).reshape(-1)


def table_statistics(
    a: np.ndarray, b: np.ndarray, alt_pattern: bool, loadings: np.ndarray, order: int = 3
) -> tuple[float, float]:
    """Ideal observer: A projected on the right loadings; B's mean group product."""
    w = loadings[1] if alt_pattern else loadings[0]
    groups = b.reshape(N_B // order, order)
    return float(np.nansum(a * w)), float(np.nanmean(np.prod(groups, axis=1)))


# ---- writers ----------------------------------------------------------------------------------
def _save_npz(path: Path, compress: bool, **arrays: Any) -> None:
    (np.savez_compressed if compress else np.savez)(path, **arrays)


def _fundus_dtype(img: np.ndarray, dtype: str) -> np.ndarray:
    return img.round().astype(np.uint8) if dtype == "uint8" else img.astype(dtype)


def _race_value(code: int, legacy: bool) -> np.ndarray:
    if legacy and code >= 0:
        return np.array(LEGACY_RACE[code])
    return np.array(code)


def _auc_by_group(y: np.ndarray, score: np.ndarray, race: np.ndarray) -> dict[str, float | None]:
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for code, name in GROUP_NAMES["race"].items():
        sel = race == code
        if y.max(initial=0) > 1:  # multi-class: the observer's AUC of the top stage vs the rest
            y_top = (y == y.max()).astype(np.int64)
            ok = sel.sum() > 0 and 0 < y_top[sel].sum() < sel.sum()
            out[name] = round(float(roc_auc_score(y_top[sel], score[sel])), 4) if ok else None
            continue
        ok = sel.sum() > 0 and 0 < y[sel].sum() < sel.sum()
        out[name] = round(float(roc_auc_score(y[sel], score[sel])), 4) if ok else None
    return out


def _csv_name(value: int, attribute: str) -> str:
    return "unknown" if value < 0 else GROUP_NAMES[attribute][value].lower()


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out} exists and is not empty (pass --force to overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def generate(
    k: SynthKnobs, out: str | Path, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Write the dataset `k` describes under `out`; returns the synth_meta dict (also written)."""
    out = Path(out)
    _prepare_out(out, force)
    sizes = SIZES[k.flavour][k.size]
    n = k.n or sizes["n"]
    rng = np.random.default_rng(k.seed)
    pop = draw_population(k, n, rng)
    pop["missing"] = draw_missing(k, pop["race_true"])
    writer: Callable[..., dict[str, Any]] = {
        "fairvision": _write_fairvision,
        "fairvlmed": _write_fairvlmed,
        "table": _write_table,
    }[k.flavour]
    observer = writer(k, out, pop, sizes, bars_enabled(progress))
    minority = pop["race_true"] != MAJORITY
    split = pop["split"]
    meta: dict[str, Any] = {
        "knobs": k.model_dump(mode="json"),
        "n": n,
        "modalities": list(MODALITIES[k.flavour]),
        "signal": {m: v.tolist() for m, v in k.strengths().items()},
        "best_auc": {
            "about": "from the latent signals: the best any model can reach (theory: Phi(d'/sqrt 2))",
            "test": best_auc_table(k, pop, np.flatnonzero(split == "test")),
            "all": best_auc_table(k, pop, np.arange(n)),
        },
        "observer_auc": {
            "about": "a hand-made statistic that knows where the signal is, on the written data (test split)",
            **{
                m: _auc_by_group(
                    pop["label"][split == "test"],
                    np.asarray(v)[split == "test"],
                    pop["race_true"][split == "test"],
                )
                for m, v in observer.items()
            },
        },
        "samples": [
            {
                "sample_id": sid,
                "split": str(split[i]),
                "label": int(pop["label"][i]),
                "race": int(pop["race_true"][i]),
                "alt_pattern": bool(k.scenario == "minority_pattern" and minority[i]),
                "latent": {m: round(float(v[i]), 5) for m, v in pop["latents"].items()},
                **(
                    {"missing": [m for m, a in pop["missing"].items() if a[i]]} if k.missing else {}
                ),
            }
            for i, sid in enumerate(_ids(k, n))
        ],
    }
    (out / "synth_meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def draw_missing(k: SynthKnobs, race: np.ndarray) -> dict[str, np.ndarray]:
    """modality -> (N,) bool, True where the sample lacks it (the `missing` knob, by true race
    group; its own random stream, so the rest of the data is the same with or without it)."""
    names = list(MODALITIES[k.flavour])
    if not k.missing:
        return {m: np.zeros(len(race), dtype=bool) for m in names}
    rng = np.random.default_rng([k.seed, 10**9 + 2])
    rates = {}
    for m in names:
        given = k.missing.get(m, [0.0])
        rates[m] = np.asarray(given * 3 if len(given) == 1 else given, dtype=float)  # (3,)
    draws = rng.random((len(names), len(race)))  # (M, N)
    absent = np.stack([draws[j] < rates[m][race] for j, m in enumerate(names)])  # (M, N)
    none_left = absent.all(0)
    if none_left.any():  # keep the modality the sample's group misses least
        table = np.stack([rates[m] for m in names])  # (M, 3)
        keep = table.argmin(0)[race[none_left]]
        absent[keep, np.flatnonzero(none_left)] = False
    return {m: absent[j] for j, m in enumerate(names)}


def _ids(k: SynthKnobs, n: int) -> list[str]:
    return (
        [f"data_{i + 1:05d}" for i in range(n)]
        if k.flavour != "table"
        else [f"P{i + 1:06d}" for i in range(n)]
    )


def _alt(k: SynthKnobs, pop: dict[str, Any], i: int) -> bool:
    return k.scenario == "minority_pattern" and pop["race_true"][i] != MAJORITY


def _fairvision_folders(k: SynthKnobs, out: Path) -> tuple[dict[str, Path], Path]:
    disease = out / "Glaucoma"
    if k.layout == "renamed":
        names = {"train": "train", "val": "val", "test": k.test_name or "test"}
        base, csv_dir = disease, disease
    elif k.layout == "dataset":
        names = {"train": "Training", "val": "Validation", "test": k.test_name or "Test"}
        base, csv_dir = disease / "Dataset", disease / "ReadMe"
    else:
        names = {"train": "Training", "val": "Validation", "test": k.test_name or "Test"}
        base, csv_dir = disease, out
    folders = {s: base / name for s, name in names.items()}
    for folder in [*folders.values(), csv_dir]:
        folder.mkdir(parents=True, exist_ok=True)
    return folders, csv_dir


def _write_csv(path: Path, rows: list[dict[str, Any]], bom: bool) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False, encoding="utf-8-sig" if bom else "utf-8")


def _write_fairvision(
    k: SynthKnobs, out: Path, pop: dict[str, Any], sizes: dict[str, Any], progress: bool
) -> dict[str, list[float]]:
    folders, csv_dir = _fairvision_folders(k, out)
    fshape = tuple(k.fundus_shape or sizes["fundus"])
    oshape = tuple(k.oct_shape or sizes["oct"])
    ids = _ids(k, len(pop["label"]))
    stats: dict[str, list[float]] = {"fundus": [], "oct": []}
    rows = []
    attrs = pop["attrs"]
    for i in tqdm(range(len(ids)), desc="synth fairvision", disable=not progress, leave=False):
        r = np.random.default_rng([k.seed, i])
        alt = _alt(k, pop, i)
        fundus = render_fundus(fshape, pop["latents"]["fundus"][i], alt, r)
        volume = render_oct(oshape, pop["latents"]["oct"][i], r, k.oct_region, k.oct_tilt)
        stats["fundus"].append(fundus_statistic(fundus, alt))
        stats["oct"].append(oct_statistic(volume))
        split = pop["split"][i]
        images = {"slo_fundus": _fundus_dtype(fundus, k.fundus_dtype), "oct_bscans": volume}
        for m, key in (("fundus", "slo_fundus"), ("oct", "oct_bscans")):
            if pop["missing"][m][i]:  # the `missing` knob: no such array in the file
                del images[key]
        _save_npz(
            folders[split] / f"{ids[i]}.npz",
            k.compress,
            **images,
            **_label_keys(k, int(pop["label"][i]), r),
            race=_race_value(int(pop["race_obs"][i]), k.race_codes == "legacy"),
            male=np.array(int(attrs["gender"][i])),
            hispanic=np.array(int(attrs["ethnicity"][i])),
            maritalstatus=np.array(int(attrs["maritalstatus"][i])),
            language=np.array(int(attrs["language"][i])),
        )
        if k.slo_jpg:
            _write_jpg(folders[split] / f"slo_{ids[i][5:]}.jpg", fundus)
        rows.append(
            {
                "filename": f"{ids[i]}.npz",
                "use": {"train": "training", "val": "validation", "test": "test"}[split],
                **(
                    {"glaucoma": "yes" if pop["label"][i] else "no"}
                    if k.n_classes == 2
                    else {"amd_condition": raw_class_values(k.n_classes)[pop["label"][i]][0]}
                ),
                "age": pop["age"][i],
                "gender": _csv_name(int(attrs["gender"][i]), "gender"),
                "race": _csv_name(int(pop["race_obs"][i]), "race"),
                "ethnicity": _csv_name(int(attrs["ethnicity"][i]), "ethnicity"),
                "language": _csv_name(int(attrs["language"][i]), "language"),
                "maritalstatus": _csv_name(int(attrs["maritalstatus"][i]), "maritalstatus"),
                "md": round(float(-2 - 4 * pop["label"][i] + r.normal(0, 2)), 2),
            }
        )
    _write_csv(csv_dir / "data_summary_glaucoma.csv", rows, k.csv_bom)
    return stats


def raw_class_values(n_classes: int) -> list[list[str]]:
    """The raw label strings the FairVision writer uses per class (AMD-style for K = 4)."""
    if n_classes == 4:
        from multifair.data.config import CLASS_PRESETS

        return list(CLASS_PRESETS["fairvision_amd"].values())
    return [[name] for name in CLASS_NAMES[n_classes]]


def _label_keys(k: SynthKnobs, y: int, r: np.random.Generator) -> dict[str, np.ndarray]:
    """The npz label: `glaucoma` 0/1, or (K > 2) an `amd_condition` string of stage y."""
    if k.n_classes == 2:
        return {"glaucoma": np.array(y)}
    values = raw_class_values(k.n_classes)[y]
    return {"amd_condition": np.array(values[int(r.integers(len(values)))])}


def _write_jpg(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img.round().astype(np.uint8)).save(path, quality=80)


def _write_fairvlmed(
    k: SynthKnobs, out: Path, pop: dict[str, Any], sizes: dict[str, Any], progress: bool
) -> dict[str, list[float]]:
    names = {"train": "Training", "val": "Validation", "test": k.test_name or "Test"}
    folders = {s: out / name for s, name in names.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    fshape = tuple(k.fundus_shape or sizes["fundus"])
    ids = _ids(k, len(pop["label"]))
    stats: dict[str, list[float]] = {"fundus": [], "note": []}
    summary_rows, gpt_rows, original_rows = [], [], []
    attrs = pop["attrs"]
    for i in tqdm(range(len(ids)), desc="synth fairvlmed", disable=not progress, leave=False):
        r = np.random.default_rng([k.seed, i])
        alt = _alt(k, pop, i)
        fundus = render_fundus(fshape, pop["latents"]["fundus"][i], alt, r)
        note, summary = render_note(
            pop["latents"]["note"][i], pop["age"][i], int(attrs["gender"][i]), r
        )
        if r.random() < k.empty_note_rate:
            note, summary = str(r.choice(["", "n/a", "nan"])), ""
        if pop["missing"]["note"][i]:  # the `missing` knob: no note written
            note, summary = "", ""
        stats["fundus"].append(fundus_statistic(fundus, alt))
        stats["note"].append(note_statistic(note))
        split = pop["split"][i]
        images = {} if pop["missing"]["fundus"][i] else {"slo_fundus": _fundus_dtype(fundus, k.fundus_dtype)}  # fmt: skip
        _save_npz(
            folders[split] / f"{ids[i]}.npz",
            k.compress,
            **images,
            glaucoma=np.array(int(pop["label"][i])),
            gender=np.array(int(attrs["gender"][i])),
            race=_race_value(int(pop["race_obs"][i]), k.race_codes == "legacy"),
            ethnicity=np.array(int(attrs["ethnicity"][i])),
            language=np.array(int(attrs["language"][i])),
            maritalstatus=np.array(int(attrs["maritalstatus"][i])),
            age=np.array(float(pop["age"][i])),
            md=np.array(round(float(-2 - 4 * pop["label"][i] + r.normal(0, 2)), 2)),
            tds=r.normal(-1 - 2 * pop["label"][i], 1.5, size=52).astype(np.float32),
            note=np.array(note),
            note_extra=np.array(f"glaucoma follow up. {note}"[:200]),
        )
        filename = f"{ids[i]}.npz"
        summary_rows.append(
            {
                "filename": filename,
                "age": pop["age"][i],
                "gender": _csv_name(int(attrs["gender"][i]), "gender"),
                "race": _csv_name(int(pop["race_obs"][i]), "race"),
                "ethnicity": _csv_name(int(attrs["ethnicity"][i]), "ethnicity"),
                "language": _csv_name(int(attrs["language"][i]), "language"),
                "maritalstatus": _csv_name(int(attrs["maritalstatus"][i]), "maritalstatus"),
                "note": note,
                "gpt4_summary": summary,
                "use": {"train": "training", "val": "validation", "test": "test"}[split],
                "glaucoma": "yes" if pop["label"][i] else "no",
            }
        )
        gpt_rows.append({"filename": filename, "note": note, "summary": summary})
        original_rows.append({"filename": filename, "note": note})
    _write_csv(out / "data_summary.csv", summary_rows, k.csv_bom)
    _write_csv(out / "gpt-4_summarized_notes.csv", gpt_rows, k.csv_bom)
    _write_csv(out / "original_notes.csv", original_rows, k.csv_bom)
    return stats


def _write_table(
    k: SynthKnobs, out: Path, pop: dict[str, Any], sizes: dict[str, Any], progress: bool
) -> dict[str, list[float]]:
    import pandas as pd

    n = len(pop["label"])
    ids = _ids(k, n)
    lrng = np.random.default_rng([k.seed, 10**9])
    loadings = np.zeros((2, N_A))
    loadings[0, :5] = lrng.uniform(0.6, 1.0, 5) * lrng.choice([-1, 1], 5)
    loadings[1, 5:] = lrng.uniform(0.6, 1.0, 5) * lrng.choice([-1, 1], 5)
    a_all, b_all = np.empty((n, N_A)), np.empty((n, N_B))
    stats: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(n):
        r = np.random.default_rng([k.seed, i])
        a, b = render_table_row(
            pop["latents"]["A"][i],
            pop["latents"]["B"][i],
            _alt(k, pop, i),
            r,
            loadings,
            k.table_order,
        )
        a_all[i], b_all[i] = a, b
        sa, sb = table_statistics(a, b, _alt(k, pop, i), loadings, k.table_order)
        stats["A"].append(sa)
        stats["B"].append(sb)
    a_all = a_all * 10 + 50  # lab-like units
    mrng = np.random.default_rng([k.seed, 10**9 + 1])
    a_all[mrng.random(a_all.shape) < 0.04] = np.nan  # not every test is ordered for everyone
    b_all[mrng.random(b_all.shape) < 0.02] = np.nan
    frame = pd.DataFrame({"patient_id": ids})
    frame["use"] = [
        {"train": "training", "val": "validation", "test": "test"}[s] for s in pop["split"]
    ]
    if k.n_classes == 2:
        frame["glaucoma"] = np.where(pop["label"] == 1, "yes", "no")
    else:  # an ordered stage, written by name
        frame["stage"] = np.asarray(CLASS_NAMES[k.n_classes])[pop["label"]]
    frame["race"] = [GROUP_NAMES["race"][c] if c >= 0 else "" for c in pop["race_obs"]]
    frame["sex"] = np.where(pop["attrs"]["gender"] == 1, "M", "F")
    frame["age"] = pop["age"]
    for j in range(N_A):
        frame[f"a{j + 1:02d}"] = a_all[:, j].round(3)
    frame["smoker"] = np.where(mrng.random(n) < 0.2, "yes", "no")
    frame["site"] = mrng.choice(["north", "south", "east", "west"], size=n)
    for j in range(N_B):
        frame[f"b{j + 1:02d}"] = b_all[:, j].round(4)
    frame["statin"] = np.where(mrng.random(n) < 0.3, "t", "f")
    frame["insurance"] = mrng.choice(["public", "private", "none"], size=n, p=[0.5, 0.4, 0.1])
    frame.loc[mrng.random(n) < 0.03, "insurance"] = np.nan
    blocks = {
        "A": [f"a{j + 1:02d}" for j in range(N_A)] + ["smoker", "site"],
        "B": [f"b{j + 1:02d}" for j in range(N_B)] + ["statin", "insurance"],
    }
    for m, columns in blocks.items():  # the `missing` knob: the whole block not measured
        frame.loc[pop["missing"][m], columns] = np.nan
    csv = out / "table.csv"
    frame.to_csv(csv, index=False, encoding="utf-8-sig" if k.csv_bom else "utf-8")
    config = {
        "data": {
            "kind": "table",
            "path": str(csv.resolve()),
            "label": {"column": "glaucoma" if k.n_classes == 2 else "stage"},
            **({} if k.n_classes == 2 else {"classes": CLASS_NAMES[k.n_classes]}),
            "attribute": "race",
            "attributes": ["race", "sex", "age"],
            "attribute_columns": {
                "race": {
                    "column": "race",
                    "names": {"Asian": "Asian", "Black": "Black", "White": "White"},
                },
                "sex": {"column": "sex", "names": {"F": "Female", "M": "Male"}},
                "age": {"column": "age", "bins": [60, 70]},
            },
            "columns": {m: {"columns": columns} for m, columns in blocks.items()},
            "split": {"column": "use"},
            "id_column": "patient_id",
            "num_workers": 0,
        }
    }
    import yaml

    (out / "table.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return stats
