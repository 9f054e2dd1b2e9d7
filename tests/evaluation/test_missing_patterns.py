"""benchmarks/missing_patterns.py: a control read with the patterns of the SAME seed's run of the
missing data (with `synth.resample` every seed is its own draw, same sample_ids, other patients
missing a modality)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "missing_patterns.py"
spec = importlib.util.spec_from_file_location("missing_patterns", SCRIPT)
patterns = importlib.util.module_from_spec(spec)
spec.loader.exec_module(patterns)

N = 40


def _write(root: Path, dataset: str, method: str, seed: int, present_b: np.ndarray) -> None:
    rng = np.random.default_rng(seed)
    race = np.tile([0, 1, 2, 2], N // 4)
    label = np.tile([0, 1], N // 2)
    frame = pd.DataFrame(
        {
            "sample_id": [f"s{i:03d}" for i in range(N)],
            "label": label,
            "score": (label + rng.random(N)) / 2,
            "race": race,
            "race_name": np.array(["Asian", "Black", "White"])[race],
            "present_a": 1,
            "present_b": present_b.astype(int),
        }
    )
    folder = root / "runs" / dataset / "race" / method / f"seed{seed}"
    folder.mkdir(parents=True)
    frame.to_csv(folder / "predictions_test.csv", index=False)


def test_the_control_takes_the_patterns_of_its_own_seed(tmp_path, capsys):
    missing = {1: np.arange(N) < 8, 2: np.arange(N) >= N - 20}  # 8 then 20 patients lack b
    for seed, absent in missing.items():
        for method in ("erm", "other"):
            _write(tmp_path, "missing", method, seed, ~absent)
            _write(tmp_path, "complete", method, seed, np.ones(N, dtype=bool))
    source = patterns.read_runs(tmp_path, "race")["missing"]
    for seed, absent in missing.items():
        got = patterns.presence(source, seed)
        assert (got["present_b"].to_numpy() == ~absent).all()
    assert patterns.main([str(tmp_path), "--presence-from", str(tmp_path), "--presence-dataset", "missing"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    # the mean over the two draws, in both datasets: (8 + 20) / 2 patients without b
    assert out.count("### b missing (n=14.0:") == 2, out
    assert out.count("### all present (n=26.0:") == 2
    assert "each seed reads its own data draw" in out
