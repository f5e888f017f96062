"""A site's privacy ledger: everything the site releases, its mechanism, and one total (epsilon, delta).

The ledger is written by the DP trainers as ``privacy_ledger.json`` in the site's fold folder (next to
``privacy_report.json``) and read by ``nnunet_fed privacy-report``. Its parts:

``releases``     every quantity that leaves the site, each with the component it belongs to, where it goes, its
                 mechanism and sensitivity (unit: one training case, add/remove adjacency):
                 * mechanisms (``accounted``): the planning summary (Laplace, from the federated plans' record),
                   the noisy number of training cases (Gaussian or Laplace, sensitivity 1), every training step
                   of the rounds and of the local fine-tuning (Poisson-subsampled Gaussian or Laplace, per-case
                   clip C: sensitivity C);
                 * values computed from those releases and from public settings only (``post-processing``, free:
                   e.g. the sampling rate q = expected batch / noisy count, the adaptive clip, the noise multiplier
                   calibrated from q, the FedAvg weight);
                 * values the user declares public (``declared public``: the dataset name, the channel names,
                   labels and file ending, the plans when ``public_plans`` is set).
``events``       the mechanisms as accountant events ``[mechanism, noise_multiplier, sample_rate, count]``
                 (single releases) and ``history`` (training steps, Opacus's ``[noise_multiplier, sample_rate,
                 steps]``), so that any accountant can recompute the total (e.g. Google's dp_accounting:
                 ``GaussianDpEvent``, ``LaplaceDpEvent``, ``PoissonSampledDpEvent``);
``rounds``       the cumulative number of training steps after each round and the total epsilon then (as the
                 round metrics reported it; ``epsilon(steps)`` recomputes it);
``total``        (epsilon, delta) of everything above together, composed by the accountant (``accountant.epsilon``);
``kept_at_site`` what is computed but never released (training and validation losses, pseudo-Dice, timings, the
                 exact number of cases, nnU-Net's fingerprint): site-local diagnostics.

Each single release also shows the epsilon it would cost alone (at the same delta): the shares do not add up to
the total (composition is sub-additive under RDP), the total is the guarantee.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from nnunet_fed.privacy import accountant as acct

LEDGER_FILE = "privacy_ledger.json"
LEDGER_FORMAT = "nnunet_fed.privacy_ledger"
ADJACENCY = ("add or remove one training case of the site (the number of cases is private: every value derived "
             "from it is computed from the noisy count)")


def truncate_history(history: list, steps: int) -> list[list]:
    """The first ``steps`` steps of a merged ``[noise_multiplier, sample_rate, steps]`` history."""
    out, left = [], int(steps)
    for s, q, n in history:
        if left <= 0:
            break
        take = min(int(n), left)
        out.append([float(s), float(q), take])
        left -= take
    return out


@dataclass
class PrivacyLedger:
    site: str
    mechanism: str  # "gaussian" (RDP/PRV, delta > 0) or "laplace" (pure epsilon, delta = 0)
    accountant: str
    delta: float
    releases: list[dict] = field(default_factory=list)
    events: list[list] = field(default_factory=list)  # single releases: [mechanism, noise_multiplier, q, count]
    history: list[list] = field(default_factory=list)  # training steps: [noise_multiplier, q, steps]
    round_steps: list[int] = field(default_factory=list)  # cumulative training steps after each round
    round_epsilons: list[float] = field(default_factory=list)  # total epsilon after each round (as reported)
    kept_at_site: list[str] = field(default_factory=list)

    def epsilon(self, steps: int | None = None) -> float:
        """Total epsilon at ``self.delta`` of the single releases and the first ``steps`` training steps (all)."""
        hist = self.history if steps is None else truncate_history(self.history, steps)
        return acct.epsilon(hist, self.delta, self.accountant, self.mechanism, self.events)

    def release(self, component: str, quantity: str, to: str, mechanism: str, **details) -> None:
        self.releases.append({"component": component, "quantity": quantity, "to": to, "mechanism": mechanism,
                              **details})

    def event_epsilon(self, event: list) -> float:
        """Epsilon of one single release alone, at the ledger's delta."""
        return acct.epsilon([], self.delta, self.accountant, self.mechanism, [event])

    def noisy_num_cases(self) -> float | None:
        """The released (noisy) number of training cases, if the ledger has it."""
        for r in self.releases:
            if r["component"] == "case count":
                return float(r["value"])
        return None

    def to_json(self) -> dict:
        eps = list(self.round_epsilons) + [None] * (len(self.round_steps) - len(self.round_epsilons))
        rounds = [{"round": r, "steps": s, "epsilon": e} for r, (s, e) in enumerate(zip(self.round_steps, eps))]
        return {
            "format": LEDGER_FORMAT, "site": self.site, "unit": "training case", "adjacency": ADJACENCY,
            "mechanism": self.mechanism, "accountant": self.accountant,
            "total": {"epsilon": self.epsilon(), "delta": self.delta},
            "releases": self.releases, "events": self.events, "history": self.history, "rounds": rounds,
            "kept_at_site": self.kept_at_site,
        }

    def write(self, folder: str) -> str:
        path = os.path.join(folder, LEDGER_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_json(), f, indent=2)
        os.replace(path + ".tmp", path)
        return path

    @classmethod
    def from_json(cls, data: dict) -> "PrivacyLedger":
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError("not an nnunet_fed privacy ledger")
        return cls(site=data["site"], mechanism=data["mechanism"], accountant=data["accountant"],
                   delta=float(data["total"]["delta"]), releases=list(data["releases"]), events=list(data["events"]),
                   history=[list(h) for h in data["history"]], round_steps=[int(r["steps"]) for r in data["rounds"]],
                   round_epsilons=[r["epsilon"] for r in data["rounds"]],
                   kept_at_site=list(data.get("kept_at_site", [])))

    @classmethod
    def load(cls, path: str) -> "PrivacyLedger":
        with open(path) as f:
            return cls.from_json(json.load(f))

    def released_names(self, to: str | None = None) -> set[str]:
        """Every released quantity's name (``quantity`` and the ``fields`` listed with it)."""
        names = set()
        for r in self.releases:
            if to is None or r["to"] == to:
                names.add(r["quantity"])
                names.update(r.get("fields", []))
        return names


# ---------------------------------------------------------------------- nnunet_fed privacy-report
def find_ledgers(folder: str) -> list[str]:
    """Every ``privacy_ledger.json`` under ``folder``; for a federation's folder (``federation_config.json``)
    also those of its sites in ``nnUNet_results`` (a simulation on this machine)."""
    found = []
    for root, _, files in os.walk(folder):
        if LEDGER_FILE in files:
            found.append(os.path.join(root, LEDGER_FILE))
        if "federation_config.json" in files and os.environ.get("nnUNet_results"):
            with open(os.path.join(root, "federation_config.json")) as f:
                cfg = json.load(f)
            sub = f"{cfg['trainer']}__{cfg['plans_identifier']}__{cfg['configuration']}"
            for site in cfg.get("site_names", []):
                path = os.path.join(os.environ["nnUNet_results"], site, sub, f"fold_{cfg['fold']}", LEDGER_FILE)
                if os.path.isfile(path):
                    found.append(path)
    return sorted(set(os.path.realpath(p) for p in found))


def independent_epsilon(ledger: PrivacyLedger) -> float | None:
    """The total recomputed with Google's dp_accounting (RDP accountant, or pure-epsilon sums), if installed."""
    try:
        import dp_accounting
    except ImportError:
        return None
    if ledger.mechanism == "laplace":
        return None  # pure epsilon: a plain sum (see accountant.laplace_step_epsilon)
    events = []
    for kind, noise, q, count in ledger.events:
        single = dp_accounting.GaussianDpEvent(noise) if kind == "gaussian" else dp_accounting.LaplaceDpEvent(noise)
        events.append(dp_accounting.SelfComposedDpEvent(single, int(count)))
    for sigma, q, steps in ledger.history:
        events.append(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps)))
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(ledger.delta))


def format_ledger(ledger: PrivacyLedger, path: str) -> str:
    total = ledger.epsilon()
    lines = [f"site {ledger.site} ({path})",
             f"  unit: one training case; adjacency: {ADJACENCY}",
             f"  total: epsilon {total:.4g} at delta {ledger.delta:g} ({ledger.mechanism}, {ledger.accountant} "
             f"accountant, everything below composed)"]
    check = independent_epsilon(ledger)
    if check is not None:
        lines.append(f"  independent check (dp_accounting RDP): epsilon {check:.4g}")
    lines.append("  released:")
    for r in ledger.releases:
        eps = f", epsilon alone {r['epsilon']:.3g}" if r.get("epsilon") is not None else ""
        steps = f", {r['steps']} steps" if r.get("steps") else ""
        lines.append(f"    [{r['component']}] {r['quantity']} -> {r['to']}: {r['mechanism']}{steps}{eps}")
    lines.append("  kept at the site: " + "; ".join(ledger.kept_at_site))
    return "\n".join(lines)


def plot_ledgers(ledgers: list[tuple[str, PrivacyLedger]], png_path: str) -> str:
    """Total epsilon after each round, per site."""
    from nnunet_fed.federation.records import plot_per_site

    series = {led.site: [(r + 1, e) for r, e in enumerate(led.round_epsilons) if e is not None] for _, led in ledgers}
    return plot_per_site([({k: v for k, v in series.items() if v}, "epsilon spent (total)", None)], png_path)


def add_privacy_report_command(sub) -> None:
    """``nnunet_fed privacy-report``: registered by nnunet_fed.cli."""
    p = sub.add_parser("privacy-report", help="print every site's privacy ledger (what it released, under which "
                                              "mechanism, total epsilon) and plot epsilon against rounds")
    p.add_argument("folder", help="a results folder: a site's fold folder, a federation's, or any folder above")
    p.add_argument("--png", default=None, help="plot file (default: <folder>/privacy_report.png)")
    p.set_defaults(func=_cmd_privacy_report)


def _cmd_privacy_report(args) -> int:
    from nnunet_fed.sites import FederationSetupError

    if not os.path.isdir(args.folder):
        raise FederationSetupError(f"{args.folder} is not a folder")
    paths = find_ledgers(args.folder)
    if not paths:
        raise FederationSetupError(f"no {LEDGER_FILE} under {args.folder}: only differentially private trainers "
                                   f"keep a privacy ledger")
    ledgers = [(p, PrivacyLedger.load(p)) for p in paths]
    for p, led in ledgers:
        print(format_ledger(led, p))
    png = plot_ledgers(ledgers, args.png or os.path.join(args.folder, "privacy_report.png"))
    print(f"epsilon against rounds: {png}")
    return 0
