"""Round records: the JSON-lines metrics file, the Dice plot, and the server's resumable state."""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
import torch

METRICS_FILE = "federation_metrics.jsonl"
PLOT_FILE = "federation_progress.png"
STATE_FILE = "federation_state.pth"


def _to_json(value):
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


class MetricsLog:
    """One JSON object per completed round: ``{"round", "sites": {site: metrics}, "rejected", "seconds"}``."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, METRICS_FILE)

    def read(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, completed_rounds: int) -> None:
        """Drop records of rounds that did not complete (after an interruption)."""
        rows = [r for r in self.read() if r["round"] < completed_rounds]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_to_json(record)) + "\n")

    def plot(self, png_path: str | None = None) -> str:
        """Pseudo Dice against rounds, per site; sites that keep their pseudo Dice (DP trainers) are drawn by the
        epsilon they have spent instead."""
        rows = self.read()
        png_path = png_path or os.path.join(os.path.dirname(self.path), PLOT_FILE)
        sites = sorted({s for r in rows for s in r["sites"]})

        def series(key):
            out = {}
            for site in sites:
                pts = [(r["round"] + 1, r["sites"][site].get(key)) for r in rows if site in r["sites"]]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    out[site] = pts
            return out

        dice, eps = series("pseudo_dice"), series("epsilon")
        panels = [p for p in ((dice, "pseudo Dice (site validation fold)", (0, 1)), (eps, "epsilon spent (total)", None))
                  if p[0]] or [({}, "pseudo Dice", (0, 1))]
        return plot_per_site(panels, png_path)


def plot_per_site(panels: list, png_path: str) -> str:
    """One panel per ``(series, y label, y limits or None)``, side by side; ``series``: site -> [(round, value)]."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, (data, label, ylim) in zip(axes[0], panels):
        for site, pts in data.items():
            ax.plot(*zip(*pts), marker="o", label=site)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if data:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _tensors(value):
    """numpy arrays (in dicts and lists) as tensors, so that the state loads with ``weights_only=True``."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors(v) for v in value]
    return value


def _arrays(value):
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, Mapping):
        return {k: _arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_arrays(v) for v in value]
    return value


def save_server_state(folder: str, completed_rounds: int, global_arrays: Mapping[str, np.ndarray],
                      run_config: dict, strategy_state: Mapping | None = None) -> None:
    """Atomically record that ``completed_rounds`` rounds are done, with the global weights after them and the
    server rule's own state (a server optimiser's moments; numbers and arrays in dicts and lists)."""
    state = {
        "completed_rounds": int(completed_rounds),
        "global_arrays": _tensors(dict(global_arrays)),
        "run_config": json.dumps(run_config, sort_keys=True),
        "strategy_state": _tensors(dict(strategy_state or {})),
    }
    path = os.path.join(folder, STATE_FILE)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_server_state(folder: str) -> dict | None:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors, ints and strings only
    return {
        "completed_rounds": int(state["completed_rounds"]),
        "global_arrays": {k: v.numpy() for k, v in state["global_arrays"].items()},
        "run_config": json.loads(state["run_config"]),
        "strategy_state": _arrays(state.get("strategy_state", {})),
    }
