"""The bad-input battery (issue 16): one case a line, over every entry point.

Each case writes a bad input (tiny real datasets from the project's own generator, a real
one-epoch run directory, then corrupted), runs the command, and expects an exit status and ONE
error line naming the file, key or value (`battery.run_case` judges it). Cases that must be
accepted (a CSV with a byte-order mark, NaN cells a table imputes) expect exit 0 and say so on
stdout. `check` functions prove that nothing already written was lost.

    pytest tests/robustness                  # the test
    python benchmarks/bad_inputs.py          # the same cases as a table
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import yaml
from battery import (
    DEMO,
    DIABETES,
    FV_TINY,
    TINY,
    Case,
    Outcome,
    Workspace,
    call,
    child_env,
    chmod_tree,
    command,
    copy_tree,
    first_npz,
    in_process,
    npz_array,
    read_only_child,
    rewrite_npz,
    snapshot,
)

# ===================================================================================== helpers


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def train(*overrides: str, config: str = DIABETES):
    """`train CONFIG TINY... overrides --out F/run` (a setup)."""
    return lambda ws, f: ["train", config, *TINY, *overrides, "--out", str(f / "run")]


def config_file(text: str):
    """`train F/config.yaml` with that text."""
    return lambda ws, f: ["train", str(write(f, "config.yaml", text)), "--out", str(f / "run")]


def fv_train(corrupt, *overrides: str):
    """Copy the FairVision tree, corrupt it (`corrupt(root)`), train the demo recipe on it."""

    def setup(ws: Workspace, f: Path) -> list[str]:
        root = copy_tree(ws.fairvision(), f / "fv")
        corrupt(root)
        return ["train", DEMO, f"data.root={root}", *FV_TINY, *overrides,
                "--out", str(f / "run")]  # fmt: skip

    return setup


def fv_data(action: str, corrupt, *args: str):
    """Copy the FairVision tree, corrupt it, run `data ACTION ROOT args`."""

    def setup(ws: Workspace, f: Path) -> list[str]:
        root = copy_tree(ws.fairvision(), f / "fv")
        corrupt(root)
        return ["data", action, str(root), *args]

    return setup


def npz(**changes):
    """Rewrite the first training npz with these arrays."""
    return lambda root: rewrite_npz(first_npz(root), **changes)


def npz_bytes(make):
    """Replace the first training npz's bytes: `make(old bytes) -> new bytes`."""

    def corrupt(root: Path) -> None:
        path = first_npz(root)
        path.write_bytes(make(path.read_bytes()))

    return corrupt


def fundus_with(value: float, dtype=np.float32):
    def corrupt(root: Path) -> None:
        path = first_npz(root)
        fundus = npz_array(path, "slo_fundus").astype(dtype)
        fundus[3, 4] = value
        rewrite_npz(path, slo_fundus=fundus)

    return corrupt


def object_array(root: Path) -> None:
    path = first_npz(root)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["race"] = np.array([{"evil": 1}], dtype=object)
    np.savez(path, **arrays)  # numpy pickles the object array


def empty_test_split(root: Path) -> None:
    for p in (root / "Glaucoma" / "Test").glob("*"):
        p.unlink()


def no_test_split(root: Path) -> None:
    empty_test_split(root)
    (root / "Glaucoma" / "Test").rmdir()


def two_test_spellings(root: Path) -> None:
    (root / "Glaucoma" / "test").mkdir()


def csv_duplicate_column(root: Path) -> None:
    path = next(root.rglob("*.csv"))
    lines = path.read_text(encoding="utf-8").splitlines()
    first = lines[0].split(",")[0]
    path.write_text(
        "\n".join(
            f"{ln},{ln.split(',')[0]}" if i else f"{ln},{first}" for i, ln in enumerate(lines)
        ),
        encoding="utf-8",
    )


def csv_with_bom(root: Path) -> None:
    for path in root.rglob("*.csv"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().removeprefix(b"\xef\xbb\xbf"))


def nothing(root: Path) -> None:
    pass


# ---- tables: a copy of the synthetic table (table.csv + table.yaml), then an edit of its text
def table(edit, *overrides: str, action: str = "train"):
    """Copy the synthetic table, `edit(csv text) -> text`, then train on it (or inspect it)."""

    def setup(ws: Workspace, f: Path) -> list[str]:
        src = ws.table()
        text = edit((src / "table.csv").read_text(encoding="utf-8"))
        csv = write(f, "table.csv", text)
        cfg = yaml.safe_load((src / "table.yaml").read_text())
        cfg["data"]["path"] = str(csv)
        cfg_path = write(f, "table.yaml", yaml.safe_dump(cfg))
        if action == "inspect":
            return ["data", "inspect", str(cfg_path)]
        return ["train", str(cfg_path), *TINY, "model.preset=small", "train.batch_size=16",
                "method.name=erm", *overrides, "--out", str(f / "run")]  # fmt: skip

    return setup


def table_garbage(ws: Workspace, f: Path) -> list[str]:
    argv = table(lambda t: t)(ws, f)
    (f / "table.csv").write_bytes(bytes(range(256)) * 4)
    return argv


def out_not_empty(ws: Workspace, f: Path) -> list[str]:
    (f / "run").mkdir()
    write(f / "run", "keep.txt", "mine")
    record(f, f / "run")
    return train()(ws, f)


def cell(column: str, value: str, row: int = 1):
    """Set one cell (data row `row`, 1-based) of the CSV text."""

    def edit(text: str) -> str:
        lines = text.splitlines()
        header = lines[0].split(",")
        cells = lines[row].split(",")
        cells[header.index(column)] = value
        lines[row] = ",".join(cells)
        return "\n".join(lines) + "\n"

    return edit


def delimiter(sep: str):
    return lambda text: text.replace(",", sep)


def duplicate_column(text: str) -> str:
    lines = text.splitlines()
    return "\n".join(f"{ln},{ln.split(',')[6]}" for ln in lines) + "\n"  # a01 again


def drop_column(column: str):
    def edit(text: str) -> str:
        rows = [ln.split(",") for ln in text.splitlines()]
        i = rows[0].index(column)
        return "\n".join(",".join(r[:i] + r[i + 1 :]) for r in rows) + "\n"

    return edit


def bom(text: str) -> str:
    return "\ufeff" + text


def nan_cells(text: str) -> str:
    for row in (1, 2, 3):
        text = cell("a01", "", row)(text)
    return cell("b02", "NaN", 4)(text)


# ---- run directories: a copy of the trained one-epoch run, then an edit
def run_copy(ws: Workspace, f: Path) -> Path:
    return copy_tree(ws.table_run(), f / "run")


def on_run(edit, *args: str, action: str = "evaluate"):
    """Copy the trained run, `edit(run_dir)`, then `ACTION RUN_DIR args` (`{f}` in args: the
    case folder)."""

    def setup(ws: Workspace, f: Path) -> list[str]:
        run = run_copy(ws, f)
        edit(run)
        record(f, run)
        extra = [a.replace("{f}", str(f)) for a in args]
        if action == "train --resume":
            return ["train", "--resume", str(run), *extra]
        return [action, str(run), *extra]

    return setup


def truncate(name: str):
    def edit(run: Path) -> None:
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])

    return edit


def zero_bytes(name: str):
    return lambda run: (run / "checkpoints" / name).write_bytes(b"")


def foreign_checkpoint(run: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(3)}}, run / "checkpoints" / "best.pt")


def old_checkpoint_format(run: Path) -> None:
    path = run / "checkpoints" / "best.pt"
    state = torch.load(path, weights_only=True)
    state["format"] = 0
    torch.save(state, path)


def config_edit(**changes):
    """Change keys of the run's config.yaml ("train.max_epochs": 3 adds, None removes)."""

    def edit(run: Path) -> None:
        path = run / "config.yaml"
        cfg = yaml.safe_load(path.read_text())
        for dotted, value in changes.items():
            *parents, last = dotted.split("__")
            node = cfg
            for p in parents:
                node = node[p]
            if value is None:
                node.pop(last)
            else:
                node[last] = value
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    return edit


def unlink(name: str):
    return lambda run: (run / "checkpoints" / name).unlink()


def keep(run: Path) -> None:
    pass


def untouched(path_of):
    """The files under `path_of(f)` are those the setup wrote (recorded by the setup)."""

    def check(ws: Workspace, f: Path, outcome: Outcome) -> None:
        recorded = json.loads((f / "snapshot.json").read_text())
        now = {k: v.hex() for k, v in snapshot(path_of(f)).items()}
        assert now == recorded, "files changed"

    return check


def record(folder: Path, target: Path) -> None:
    (folder / "snapshot.json").write_text(
        json.dumps({k: v.hex() for k, v in snapshot(target).items()})
    )


# ---- predict and audit inputs
def diabetes_csv(f: Path, edit=lambda frame: frame) -> Path:
    from sklearn.datasets import load_diabetes

    frame = edit(load_diabetes(scaled=False, as_frame=True).frame.drop(columns=["target"]))
    path = f / "new.csv"
    frame.to_csv(path, index=False)
    return path


def predict_table(edit):
    def setup(ws: Workspace, f: Path) -> list[str]:
        run = ws.table_run()
        return ["predict", str(run), str(diabetes_csv(f, edit)), "--out", str(f / "pred.csv")]

    return setup


def set_value(column: str, value, row: int = 0):
    def edit(frame):
        frame = frame.astype({column: object})
        frame.loc[row, column] = value
        return frame

    return edit


AUDIT_CSV = "label,score,race\n" + "".join(
    f"{i % 2},{0.2 + 0.6 * (i % 2) - 0.05 * (i % 3)},{['a', 'b', 'c'][i % 3]}\n" for i in range(30)
)


def audit(text: str | bytes, *args: str, out: str = "audit"):
    def setup(ws: Workspace, f: Path) -> list[str]:
        path = write(f, "pred.csv", text)
        return ["audit", str(path), "--attribute", "race", "--n-boot", "0", "--no-report",
                "--out", str(f / out), *args]  # fmt: skip

    return setup


def audit_line(i: int, line: str) -> str:
    lines = AUDIT_CSV.splitlines()
    lines[i] = line
    return "\n".join(lines) + "\n"


# ---- benchmark configs
BENCH = f"""name: bad
base: {DIABETES}
output: OUT
overrides: {{train: {{epochs: 1, progress: false}}}}
attributes: [sex]
methods:
  - {{label: erm, method: {{name: erm}}}}
seeds: [0]
reference: erm
"""


def bench(text: str):
    def setup(ws: Workspace, f: Path) -> list[str]:
        path = write(f, "bench.yaml", text.replace("OUT", str(f / "out")))
        return ["benchmark", str(path), "--plan"]

    return setup


# ---- cache
def cached(ws: Workspace, f: Path) -> list[str]:
    """The tree and its prepared cache; `train` with data.cache naming it."""
    root = copy_tree(ws.fairvision(), f / "fv")
    cache = f / "cache"
    code, _, err = call(["data", "prepare", str(root), str(cache), "--image-size", "16",
                         "--oct-slices", "5", "--workers", "0", "--no-progress"])  # fmt: skip
    assert code == 0, err
    return ["train", DEMO, f"data.root={root}", f"data.cache={cache}", *FV_TINY,
            "--out", str(f / "run")]  # fmt: skip


def stale_cache(ws: Workspace, f: Path) -> list[str]:
    """One source npz rewritten under a prepared cache."""
    argv = cached(ws, f)
    path = first_npz(f / "fv")
    rewrite_npz(path, glaucoma=1 - npz_array(path, "glaucoma"))
    return argv


def truncated_cache(ws: Workspace, f: Path) -> list[str]:
    argv = cached(ws, f)
    array = sorted((f / "cache").rglob("fundus.npy"))[0]
    array.write_bytes(array.read_bytes()[:200])
    return argv


# ---- processes: a lock, SIGTERM, a full disk, read-only folders
LONG = [DIABETES, *TINY, "train.epochs=200", "train.batch_size=16", "train.log_every=1"]


def start_training(f: Path) -> subprocess.Popen:
    """A `train` child that runs long; returns once it has logged a step (it holds the lock)."""
    proc = subprocess.Popen(
        command(["train", *LONG, "--out", str(f / "run")]),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    log, deadline = f / "run" / "log.jsonl", time.monotonic() + 180
    while not (log.is_file() and log.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the training child did not start: {proc.stderr.read()}")
        time.sleep(0.02)
    return proc


def sigterm_runner(ws: Workspace, f: Path, argv: list[str]) -> Outcome:
    t0 = time.perf_counter()
    proc = start_training(f)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    return Outcome(proc.returncode, "", err, time.perf_counter() - t0)


def sigterm_check(ws: Workspace, f: Path, outcome: Outcome) -> None:
    state = torch.load(f / "run" / "checkpoints" / "last.pt", weights_only=True)
    step = int(outcome.err.split("after step ")[1].split()[0])
    assert state["step"] == step, f"last.pt holds step {state['step']}, the message says {step}"
    assert (f / "run" / "config.yaml").is_file() and (f / "run" / "env.json").is_file()


def lock_runner(ws: Workspace, f: Path, argv: list[str]) -> Outcome:
    """A second `train` (in this process) while a first one (a child) trains into RUN_DIR."""
    t0 = time.perf_counter()
    proc = start_training(f)
    try:
        (f / "config.before").write_bytes((f / "run" / "config.yaml").read_bytes())
        code, out, err = call(["train", "--resume", str(f / "run")])
        (f / "pid").write_text(str(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)  # the first run stops cleanly and checkpoints
        _, child_err = proc.communicate(timeout=180)
    (f / "child.txt").write_text(f"{proc.returncode}\n{child_err}")
    return Outcome(code, out, err, time.perf_counter() - t0)


def lock_check(ws: Workspace, f: Path, outcome: Outcome) -> None:
    pid = (f / "pid").read_text()
    assert f"in use by process {pid}" in outcome.err, "the message does not name the owner"
    assert (f / "run" / "config.yaml").read_bytes() == (f / "config.before").read_bytes()
    child = (f / "child.txt").read_text()
    assert child.startswith("143\n"), f"the first run did not stop cleanly: {child[-300:]}"
    torch.load(f / "run" / "checkpoints" / "last.pt", weights_only=True)  # loadable


def disk_full_runner(ws: Workspace, f: Path, argv: list[str]) -> Outcome:
    """The third checkpoint write of a two-epoch run hits a full disk half-way through."""
    real_save, calls = torch.save, []

    def half_then_enospc(obj, fh, *args, **kwargs):
        calls.append(1)
        if len(calls) < 3:
            return real_save(obj, fh, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with mock.patch("multifair.training.checkpoint.torch.save", half_then_enospc):
        return in_process(ws, f, argv)


def disk_full_check(ws: Workspace, f: Path, outcome: Outcome) -> None:
    ckpt = f / "run" / "checkpoints"
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert state["epoch"] == 1, f"last.pt holds epoch {state['epoch']}"
    torch.load(ckpt / "best.pt", weights_only=True)
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.pt", "last.pt"], "a temporary file"


def read_only(folder_of, then):
    """Make `folder_of(f)` read-only (after `then` wrote the inputs) - the setup."""

    def setup(ws: Workspace, f: Path) -> list[str]:
        argv = then(ws, f)
        target = folder_of(f)
        target.mkdir(exist_ok=True)
        record(f, target)
        chmod_tree(target, 0o555)
        return argv

    return setup


def writable_again(check):
    def wrapped(ws: Workspace, f: Path, outcome: Outcome) -> None:
        for p in [f, *f.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        check(ws, f, outcome)

    return wrapped


def resume_read_only(ws: Workspace, f: Path) -> list[str]:
    run_copy(ws, f)
    return ["train", "--resume", str(f / "run"), "train.epochs=2"]


FILE = r"[\w/.-]*"  # a path in a message
RUN_KEPT = untouched(lambda f: f / "run")  # the run directory is as the setup left it


# ======================================================================================= cases
CASES: list[Case] = [
    # ---- config files and overrides (train)
    Case("config-missing-file", "config", lambda ws, f: ["train", str(f / "nope.yaml")], 2, r"config file not found: \S*nope\.yaml$"),
    Case("config-zero-byte", "config", config_file(""), 2, r"config\.yaml: data: Field required"),
    Case("config-not-yaml", "config", config_file("data: [kind, {root\n"), 2, r"config\.yaml: line \d+, column \d+: not valid YAML"),
    Case("config-binary-garbage", "config", lambda ws, f: ["train", str(write(f, "c.yaml", b"\xff\xfe\x00\x81garbage"))], 2, r"c\.yaml: not a UTF-8 text file \(byte 0"),
    Case("config-top-level-list", "config", config_file("- data\n- train\n"), 2, r"config\.yaml: the top level must be a mapping, got list"),
    Case("config-misspelt-section", "config", config_file(Path(DIABETES).read_text() + "trian: {epochs: 1}\n"), 2, r"config\.yaml: trian: unknown key; did you mean 'train'\?"),
    Case("config-misspelt-train-key", "config", train("train.epoch=3"), 2, r"diabetes\.yaml: train\.epoch: unknown key; did you mean 'epochs'\? \(got 3"),
    Case("config-misspelt-data-key", "config", train("data.atribute=age"), 2, r"data\.atribute: unknown key; did you mean 'attribute'\?"),
    Case("config-misspelt-method-param", "config", train("method.tua=0.1"), 2, r"method\.tua: unknown key; did you mean 'tau'\?"),
    Case("config-unknown-key-lists-valid", "config", train("output.zzz=1"), 2, r"output\.zzz: unknown key \(valid keys: dir, n_boot, predictions\)"),
    Case("config-wrong-type", "config", train("train.epochs=many"), 2, r"train\.epochs: .*integer.*\(got 'many'\)"),
    Case("config-out-of-range", "config", train("train.lr=-1"), 2, r"train\.lr: Input should be greater than 0 \(got -1"),
    Case("config-unknown-method", "config", train("method.name=ermm"), 2, r"diabetes\.yaml: method\.name: method 'ermm' not found\. Available: \[.*'erm'"),
    Case("config-key-of-another-kind", "config", train("data.root=/x"), 2, r"`root` is only for kind fairvision / fairvlmed, not table"),
    Case("config-override-without-equals", "config", lambda ws, f: ["train", DIABETES, "epochs"], 2, r"override 'epochs' is not of the form key=value"),
    Case("config-select-from-too-late", "config", train("train.select_from=1"), 2, r"train: .*select_from \(1\) must be below epochs \(1\)"),
    # ---- FairVision npz trees (train)
    Case("npz-truncated", "train", fv_train(npz_bytes(lambda b: b[: len(b) // 2])), 2, rf"{FILE}data_\d+\.npz: unreadable npz"),
    Case("npz-zero-byte", "train", fv_train(npz_bytes(lambda b: b"")), 2, rf"{FILE}data_\d+\.npz: unreadable npz"),
    Case("npz-garbage", "train", fv_train(npz_bytes(lambda b: np.random.default_rng(0).bytes(300))), 2, rf"{FILE}data_\d+\.npz: unreadable npz"),
    Case("npz-object-array", "train", fv_train(object_array), 2, r"data_\d+\.npz: key 'race': object array \(would need pickle\); refusing to load"),
    Case("npz-missing-key", "train", fv_train(lambda r: rewrite_npz(first_npz(r), drop="glaucoma")), 2, r"data_\d+\.npz: .*'glaucoma'.*missing key"),
    Case("npz-label-2", "train", fv_train(npz(glaucoma=np.array(2))), 2, r"data_\d+\.npz: .*'glaucoma'.*label 2 is outside \{0, 1\}"),
    Case("npz-label-nan", "train", fv_train(npz(glaucoma=np.array(np.nan))), 2, r"data_\d+\.npz: .*'glaucoma'.*label is NaN"),
    Case("npz-label-string", "train", fv_train(npz(glaucoma=np.array("maybe"))), 2, r"data_\d+\.npz: .*'glaucoma'.*'maybe'"),
    Case("npz-race-code-unseen", "train", fv_train(npz(race=np.array(7))), 2, r"data_\d+\.npz: .*'race'.*7 is not a race code"),
    Case("npz-race-string-unknown", "train", fv_train(npz(race=np.array("Martian"))), 2, r"data_\d+\.npz: .*'race'.*'Martian' is not a race value"),
    Case("npz-fundus-wrong-shape", "train", fv_train(npz(slo_fundus=np.zeros(16, np.uint8))), 2, r"data_\d+\.npz: .*'slo_fundus'.*\(16,\)"),
    Case("npz-oct-not-a-volume", "train", fv_train(npz(oct_bscans=np.zeros((16, 16), np.uint8))), 2, r"data_\d+\.npz: .*'oct_bscans'.*\(16, 16\).*not a volume"),
    Case("npz-fundus-string-dtype", "train", fv_train(npz(slo_fundus=np.full((16, 16), "x"))), 2, r"data_\d+\.npz: .*'slo_fundus'.*dtype"),
    Case("npz-fundus-nan", "train", fv_train(fundus_with(np.nan)), 2, r"data_\d+\.npz: .*'slo_fundus'.*non-finite pixel value nan"),
    Case("npz-fundus-inf", "train", fv_train(fundus_with(np.inf)), 2, r"data_\d+\.npz: .*'slo_fundus'.*non-finite pixel value inf"),
    Case("npz-fundus-out-of-range", "train", fv_train(fundus_with(400.0, np.float64)), 2, r"data_\d+\.npz: .*'slo_fundus'.*outside 0\.\.255"),
    Case("fv-empty-split-folder", "train", fv_train(empty_test_split), 2, r"Test: empty split folder|empty split folder.*Test"),
    Case("fv-missing-split-folder", "train", fv_train(no_test_split), 2, r"no folder for split\(s\) \['test'\]"),
    Case("fv-two-spellings-of-a-split", "train", fv_train(two_test_spellings), 2, r"'Test'.*'test'.*keep one"),
    Case("fv-root-missing", "train", fv_train(nothing, "data.root=/nonexistent/fv"), 2, r"/nonexistent/fv"),
    Case("fv-csv-duplicate-column", "data inspect", fv_data("inspect", csv_duplicate_column), 2, r"\.csv: duplicate column '\w+'"),
    Case("fv-csv-with-bom-accepted", "data inspect", fv_data("inspect", csv_with_bom), 0, r"^problems: 0$", stream="out"),
    # ---- tables (train)
    Case("table-zero-byte", "train", table(lambda t: ""), 2, r"table\.csv: cannot read table \(No columns to parse"),
    Case("table-binary-garbage", "train", table_garbage, 2, r"table\.csv: cannot read table"),
    Case("table-semicolon-delimiter", "train", table(delimiter(";")), 2, r"table\.csv: .*one column.*';'"),
    Case("table-tab-delimiter-in-csv", "train", table(delimiter("\t")), 2, r"table\.csv: .*one column.*tab"),
    Case("table-duplicate-column", "train", table(duplicate_column), 2, r"table\.csv: duplicate column 'a01'"),
    Case("table-missing-label-column", "train", table(drop_column("glaucoma")), 2, r"table\.csv: column 'glaucoma' not found"),
    Case("table-label-outside-01", "train", table(cell("glaucoma", "2")), 2, r"table\.csv: row 0: column 'glaucoma': label 2\.0 is outside \{0, 1\}"),
    Case("table-label-missing", "train", table(cell("glaucoma", "")), 2, r"table\.csv: row 0: column 'glaucoma': label is missing"),
    Case("table-cell-not-a-number", "train", table(cell("a01", "abc")), 2, r"table\.csv: row 0: column 'a01': 'abc' is not a number"),
    Case("table-inf-in-feature", "train", table(cell("a01", "inf")), 2, r"table\.csv: row 0: column 'a01': inf is not finite"),
    Case("table-attribute-value-unseen", "train", table(cell("race", "Martian")), 2, r"table\.csv: row 0: column 'race': 'Martian' is not a known group \['Asian', 'Black', 'White'\]"),
    Case("table-split-value-unknown", "train", table(cell("use", "trainingg")), 2, r"table\.csv: .*'use'.*'trainingg'"),
    Case("table-with-bom-accepted", "train", table(bom), 0, r"^run directory: \S+run$", stream="out"),
    Case("table-nan-cells-imputed", "train", table(nan_cells), 0, r"^run directory: \S+run$", stream="out"),
    # ---- data synth / inspect / prepare
    Case("synth-out-not-empty", "data synth", lambda ws, f: ["data", "synth", "table", str(write(f, "x", "").parent)], 2, r"not empty.*--force"),
    Case("synth-group-mix-bad", "data synth", lambda ws, f: ["data", "synth", "table", str(f / "o"), "--group-mix", "1,2"], 2, r"group_mix"),
    Case("synth-signal-not-numbers", "data synth", lambda ws, f: ["data", "synth", "table", str(f / "o"), "--signal", "A=abc"], 2, r"--signal 'A=abc'"),
    Case("inspect-root-missing", "data inspect", lambda ws, f: ["data", "inspect", str(f / "nope")], 2, r"nope.* is not a folder"),
    Case("inspect-deep-nan-pixel", "data inspect", fv_data("inspect", fundus_with(np.nan), "--deep"), 1, r"data_\d+\.npz.*slo_fundus.*nan", stream="out"),
    Case("prepare-root-missing", "data prepare", lambda ws, f: ["data", "prepare", str(f / "nope")], 2, r"data prepare: \S*nope is not a folder or a config file"),
    Case("prepare-unknown-split", "data prepare", fv_data("prepare", nothing, str(Path("/tmp")), "--splits", "train,tset"), 2, r"--splits: unknown split\(s\) \['tset'\]"),
    Case("prepare-truncated-npz", "data prepare", fv_data("prepare", npz_bytes(lambda b: b[:100]), "--workers", "0", "--no-progress", "--image-size", "16"), 2, r"data_\d+\.npz: unreadable npz"),
    Case("cache-changed-under-it", "train", stale_cache, 2, r"cache.*data_\d+\.npz.*changed|changed.*data_\d+\.npz"),
    Case("cache-truncated-array", "train", truncated_cache, 2, r"cache.*fundus\.npy"),
    Case("cache-path-missing", "train", fv_train(nothing, "data.cache=/nonexistent/cache"), 2, r"data\.cache: .*/nonexistent/cache"),
    # ---- run directories and checkpoints (evaluate, predict, train --resume)
    Case("evaluate-not-a-run-dir", "evaluate", lambda ws, f: ["evaluate", str(f)], 2, r"not a run directory \(no config\.yaml\)"),
    Case("evaluate-no-checkpoint", "evaluate", on_run(unlink("best.pt")), 2, r"run: no checkpoints/best\.pt", RUN_KEPT),
    Case("evaluate-truncated-checkpoint", "evaluate", on_run(truncate("best.pt")), 2, r"checkpoints/best\.pt: not a readable multifair checkpoint", RUN_KEPT),
    Case("evaluate-zero-byte-checkpoint", "evaluate", on_run(zero_bytes("best.pt")), 2, r"checkpoints/best\.pt: empty file \(0 bytes\), not a multifair checkpoint", RUN_KEPT),
    Case("evaluate-foreign-checkpoint", "evaluate", on_run(foreign_checkpoint), 2, r"checkpoints/best\.pt: not a multifair checkpoint", RUN_KEPT),
    Case("evaluate-checkpoint-of-another-config", "evaluate", on_run(config_edit(model__dim=8)), 2, r"checkpoints/best\.pt: the checkpoint does not fit this model \(size mismatch for \S+: .*\): was the model config changed\?", RUN_KEPT),
    Case("evaluate-run-dir-older-version-config", "evaluate", on_run(config_edit(train__max_epochs=3)), 2, r"run/config\.yaml: train\.max_epochs: unknown key; did you mean 'epochs'\?", RUN_KEPT),
    Case("evaluate-run-dir-older-checkpoint-format", "evaluate", on_run(old_checkpoint_format), 2, r"checkpoints/best\.pt: checkpoint format 0, written by another multifair version; this version reads format 1", RUN_KEPT),
    Case("evaluate-unknown-split", "evaluate", on_run(keep, "--split", "tset"), 2, r"--split 'tset': not one of", RUN_KEPT),
    Case("evaluate-config-yaml-garbage", "evaluate", on_run(lambda r: (r / "config.yaml").write_text("data: [\n")), 2, r"run/config\.yaml: line \d+, column \d+: not valid YAML", RUN_KEPT),
    Case("resume-not-a-run-dir", "train", lambda ws, f: ["train", "--resume", str(f)], 2, r"not a run directory \(no config\.yaml\)"),
    Case("resume-with-a-config-file", "train", on_run(keep, DIABETES, action="train --resume"), 2, r"--resume continues .* give only key=value overrides", RUN_KEPT),
    Case("resume-truncated-last-checkpoint", "train", on_run(truncate("last.pt"), "train.epochs=2", action="train --resume"), 2, r"checkpoints/last\.pt: not a readable multifair checkpoint", RUN_KEPT),
    Case("train-out-not-empty", "train", out_not_empty, 2, r"run directory \S+ already exists and is not empty", RUN_KEPT),
    Case("predict-data-missing", "predict", lambda ws, f: ["predict", str(ws.table_run()), str(f / "nope.csv"), "--out", str(f / "p.csv")], 2, r"DATA '\S*nope\.csv': no such folder or file"),
    Case("predict-data-of-another-kind", "predict", lambda ws, f: ["predict", str(ws.table_run()), str(write(f, "d.yaml", f"data: {{kind: fairvision, root: {ws.fairvision()}}}\n")), "--out", str(f / "p.csv")], 2, r"kind 'fairvision', but the run was trained on 'table'"),
    Case("predict-feature-column-missing", "predict", predict_table(lambda fr: fr.drop(columns=["bmi"])), 2, r"new\.csv: column 'bmi' not found"),
    Case("predict-attribute-value-unseen", "predict", predict_table(set_value("sex", 3)), 2, r"new\.csv: .*'sex'.*3"),
    Case("predict-inf-in-feature", "predict", predict_table(set_value("bmi", "inf")), 2, r"new\.csv: row 0: column 'bmi': inf is not finite"),
    # ---- audit
    Case("audit-missing-file", "audit", lambda ws, f: ["audit", str(f / "nope.csv"), "--attribute", "race"], 2, r"predictions file not found: \S*nope\.csv"),
    Case("audit-zero-byte", "audit", audit(""), 2, r"pred\.csv: cannot read as CSV"),
    Case("audit-semicolon-delimiter", "audit", audit(AUDIT_CSV.replace(",", ";")), 2, r"pred\.csv: .*one column.*';'"),
    Case("audit-duplicate-column", "audit", audit(AUDIT_CSV.replace("label,score,race", "label,score,label", 1).replace("race", "x")), 2, r"pred\.csv: duplicate column 'label'"),
    Case("audit-label-outside-01", "audit", audit(audit_line(3, "2,0.5,a")), 2, r"pred\.csv line 4: 'label' = 2; labels must be 0 or 1"),
    Case("audit-score-nan", "audit", audit(audit_line(3, "1,nan,a")), 2, r"pred\.csv line 4: 'score' is empty or NaN; scores must be probabilities"),
    Case("audit-score-inf", "audit", audit(audit_line(3, "1,inf,a")), 2, r"pred\.csv line 4: 'score' = inf; scores must be probabilities"),
    Case("audit-with-bom-accepted", "audit", audit(b"\xef\xbb\xbf" + AUDIT_CSV.encode()), 0, r"^wrote \S+metrics\.json$", stream="out"),
    # ---- benchmark
    Case("benchmark-config-missing", "benchmark", lambda ws, f: ["benchmark", str(f / "nope.yaml")], 2, r"nope\.yaml"),
    Case("benchmark-misspelt-key", "benchmark", bench(BENCH.replace("seeds:", "seed:")), 2, r"bench\.yaml: seed: unknown key; did you mean 'seeds'\?"),
    Case("benchmark-unknown-method", "benchmark", bench(BENCH.replace("{name: erm}", "{name: ermm}")), 2, r"bench\.yaml: methods: entry 'erm': method 'ermm' not found\. Available"),
    Case("benchmark-collect-not-a-benchmark", "benchmark", lambda ws, f: ["benchmark", "collect", str(f)], 2, r"benchmark"),
    # ---- processes: a lock, SIGTERM, a full disk, read-only folders
    Case("two-trains-one-run-dir", "train", lambda ws, f: [], 2, r"run directory \S+ is in use by process \d+", lock_check, lock_runner),
    Case("sigterm-during-training", "train", lambda ws, f: [], 143, r"stopped by SIGTERM after step \d+ .*checkpointed; resume with multifair train --resume \S+run$", sigterm_check, sigterm_runner),
    Case("disk-full-while-checkpointing", "train", train("train.epochs=2"), 2, r"checkpoints/\w+\.pt: cannot write the checkpoint \(No space left on device\); the previous \w+\.pt is intact", disk_full_check, disk_full_runner),
    Case("train-out-read-only", "train", read_only(lambda f: f / "ro", lambda ws, f: ["train", DIABETES, *TINY, "--out", str(f / "ro" / "run")]), 2, r"cannot create the run directory \S+/ro/run \(Permission denied\)", writable_again(untouched(lambda f: f / "ro")), read_only_child),
    Case("resume-run-dir-read-only", "train", read_only(lambda f: f / "run", resume_read_only), 2, r"cannot write to the run directory \S+/run \(Permission denied\)", writable_again(RUN_KEPT), read_only_child),
    Case("predict-out-read-only", "predict", read_only(lambda f: f / "ro", lambda ws, f: ["predict", str(ws.table_run()), str(diabetes_csv(f)), "--out", str(f / "ro" / "p.csv")]), 2, r"cannot write \S+/ro/p\.csv \(Permission denied\)", writable_again(untouched(lambda f: f / "ro")), read_only_child),
    Case("audit-out-read-only", "audit", read_only(lambda f: f / "ro", audit(AUDIT_CSV, out="ro/audit")), 2, r"cannot write \S+/ro/audit\S* \(Permission denied\)", writable_again(untouched(lambda f: f / "ro")), read_only_child),
]  # fmt: skip
