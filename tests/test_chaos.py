"""Chaos: a 12-trial Optuna + ASHA sweep whose driver is killed three times at random moments
(SIGKILL of the driver and its Ray, or Ctrl-C), each time continued with `--resume`, then resumed
to its end: nothing lost, nothing doubled, MLflow = Optuna = Tune (tests/sweep_checks.py).

The moments are drawn from a seeded generator over the first ~100 s of each launch, so kills land
in the driver's start-up (before Tune saved its state) as well as mid-training and mid-evaluation.
One seed runs in the suite; more from the command line, e.g. on a loaded machine:

    python tests/test_chaos.py 0 1 2 3 4
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep_checks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
TRIALS = 12
KILLS = 3


def chaos_spec(root: Path) -> Path:
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec.update(name="chaos", experiment="chaos", num_samples=TRIALS, max_concurrent=2,
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    spec["trial"].update(max_epochs=2, warmup=1, train_subset=300, val_subset=100, test_subset=50,
                         test_samples=50, image_every=1)
    path = root / "chaos.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _command(root: Path, spec: Path) -> list[str]:
    resumable = list((root / "sweeps").glob("chaos-*/sweep.json")) if (root / "sweeps").is_dir() else []
    return [sys.executable, "-m", "sweeper.cli", "run", str(spec), *(["--resume"] if resumable else [])]


def _as_from_a_terminal() -> None:
    """A command typed in a terminal gets SIGINT's default action; one started from a background
    job (CI, nohup) inherits SIGINT ignored, and a Ctrl-C before the driver installs its own
    handler would be lost, which no user at a terminal sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_all(proc: subprocess.Popen) -> None:
    """The driver's process group (its Ray), whatever is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def chaos(root: Path, seed: int, data_dir: Path) -> list[str]:
    """Run the chaos sweep under `root`; returns what happened, a line per launch."""
    rng = random.Random(seed)
    spec = chaos_spec(root)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SWEEPER_DATA_DIR": str(data_dir)}
    events = []
    kinds = ["SIGKILL", "Ctrl-C", rng.choice(["SIGKILL", "Ctrl-C"])]    # both kinds, in a random order
    rng.shuffle(kinds)
    for i, how in enumerate(kinds):
        command = _command(root, spec)
        delay = rng.uniform(3.0, 100.0)
        log = open(root / f"launch{i}.log", "w")
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_as_from_a_terminal)
        try:
            proc.wait(timeout=delay)
            events.append(f"launch {i} ({command[-1]}): ended by itself with {proc.returncode} before {how} "
                          f"at {delay:.1f} s")
            assert proc.returncode == 0, (root / f"launch{i}.log").read_text()[-3000:]
            return events
        except subprocess.TimeoutExpired:
            pass
        if how == "SIGKILL":
            _kill_all(proc)
        else:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            finally:
                code = proc.returncode
                _kill_all(proc)
            # 130 from the driver; -SIGINT if it came before Python had set up its own handler.
            assert code in (130, -signal.SIGINT), (code, (root / f"launch{i}.log").read_text()[-3000:])
        events.append(f"launch {i} ({command[-1]}): {how} at {delay:.1f} s")
    command = _command(root, spec)
    last = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200,
                          start_new_session=True)
    (root / "last.log").write_text(last.stdout + last.stderr)
    events.append(f"last launch ({command[-1]}): exit {last.returncode}")
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert "Traceback" not in last.stdout + last.stderr, last.stderr[-3000:]
    return events


@pytest.mark.slow
def test_a_sweep_killed_three_times_at_random_loses_and_doubles_nothing(tmp_path, shared_datasets):
    events = chaos(tmp_path, 0, shared_datasets)
    table = sweep_checks.check_agreement(tmp_path, name="chaos", experiment="chaos", trials=TRIALS)
    print("\n" + "\n".join(events), "\n", table)


if __name__ == "__main__":
    data = Path(os.environ.get("SWEEPER_DATA_DIR", ROOT.parent / "shared" / "datasets")).resolve()
    for seed in map(int, sys.argv[1:] or ["0"]):
        folder = Path(tempfile.mkdtemp(prefix=f"chaos-{seed}-"))
        t0 = time.time()
        try:
            happened = chaos(folder, seed, data)
            sweep_checks.check_agreement(folder, name="chaos", experiment="chaos", trials=TRIALS)
        except BaseException:
            print(f"seed {seed}: FAILED; its logs and stores are kept in {folder}", flush=True)
            raise
        print(f"seed {seed}: agreement after {time.time() - t0:.0f} s; " + "; ".join(happened), flush=True)
        shutil.rmtree(folder)
