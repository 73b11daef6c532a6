# How many of each trial's learned pseudo-inputs moved away from their initialisation
# N(0.5, 0.02) (REF's for Frey Faces): a pixel std over 0.05 after the model's hardtanh(0, 1).
# Run in the sweep's folder (its mlartifacts/, the tested weights each trial logged) with the
# project's venv; writes pseudo_inputs_moved.csv beside this file.
import csv, glob
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
trials = {int(r["K"]): r for r in csv.DictReader(open(HERE / "trials.csv"))}
rows = []
for f in glob.glob("mlartifacts/frey-k-lr/models/*/artifacts/weights.pt"):
    saved = torch.load(f, map_location="cpu", weights_only=False)
    u = saved["state_dict"]["prior.pseudo_params"].float()               # [K, D]
    std = torch.nn.functional.hardtanh(u, 0.0, 1.0).std(1)              # [K]
    t = trials[u.shape[0]]
    assert int(t["best_epoch"]) == int(saved["best_epoch"]), (t["trial"], saved["best_epoch"])
    rows.append(dict(trial=t["trial"], K=u.shape[0], lr=float(t["lr"]), stop_reason=t["stop_reason"],
                     tested_epoch=int(saved["best_epoch"]), test_ll=t["test_ll"], moved=int((std > 0.05).sum()),
                     median_pixel_std=round(float(std.median()), 4)))
rows.sort(key=lambda r: r["K"])
with open(HERE / "pseudo_inputs_moved.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
for r in rows: print(r)
