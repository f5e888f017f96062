"""DP-SGD inside nnU-Net's training loop: the trainer base of nnUNetTrainerDP, nnUNetTrainerFedDP, nnUNetTrainerFedADP.

Each of nnU-Net's iterations becomes one *logical* DP-SGD step:

1. a Poisson-sampled logical batch (every training case with probability ``q``, one patch each, nnU-Net's
   augmentation; ``sampling.PoissonCaseLoader``);
2. in physical batches of nnU-Net's batch size: exact per-sample gradients of nnU-Net's loss (Dice + CE, deep
   supervision), each clipped to ``C`` (L2; L1 in Laplace mode) and summed (``per_sample.PerSampleClipper``);
3. noise added once: ``N(0, (sigma_g C)^2)`` per coordinate (Laplace ``b_g C`` in Laplace mode), the sum divided by
   the expected logical batch size (``expected_batch_size``, or ``q N~`` with ``sampling_rate``; also for an empty
   batch, which releases noise only);
4. nnU-Net's optimizer step (SGD, momentum, poly learning rate; FedProx's proximal term if set);
5. with adaptive clipping, the noisy count of unclipped cases moves ``C`` (``adaptive.AdaptiveClip``);
6. the accountant records (sigma, q, 1 step).

Unit and adjacency: one training case, added or removed, so the number of training cases ``N`` is private too.
Before its first step a site releases ``N~ = N + noise`` once (Gaussian of std ``case_count_noise``, Laplace of
that scale in Laplace mode; sensitivity 1, accounted) and every value that depends on ``N`` is computed from
``N~``: the sampling rate ``q = expected_batch_size / max(N~, expected_batch_size)``, the divisor, the noise
multiplier calibrated from ``q``, the FedAvg weight. Plans derived from exact fingerprints are refused unless
declared public (``public_plans``); with federated plans made from DP summaries the site's planning epsilon is
part of the same total. Which cases are training cases is decided per case (``hash_split``), so adding one
case never moves another between training and validation. Round metrics are released only if accounted or
derived from accounted values (``RELEASED_METRICS``); losses, pseudo-Dice and timings stay at the site.
Everything released is listed in the site's privacy ledger (``ledger``), and every epsilon printed is the total.
Noise, Poisson sampling and the data pipeline's randomness come from OS entropy (``randomness``).

The noise multiplier is calibrated before training from (target_epsilon, target_delta), the single releases
(planning, case count) and the whole schedule (rounds x local steps, ``q``, optional decay over rounds); a
target the schedule cannot meet is refused with the epsilon it would reach. The accountant history, the
threshold, the step count and the noisy case count live in every checkpoint, so the accounting continues across
rounds, resumes and processes. Each round's metrics carry the site's total (epsilon, delta) so far, and
``privacy_report.json`` in the site's fold folder holds the final report.

AMP: nnU-Net trains with autocast + GradScaler on CUDA; DP steps run in float32 (per-sample gradients and their
norms in half precision would need per-sample loss scaling), validation keeps autocast.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_fed.federation.trainer import nnUNetTrainerFederated
from nnunet_fed.federation.update import SHARED_DATASET_JSON_KEYS, shared_dataset_json
from nnunet_fed.privacy import accountant as acct
from nnunet_fed.privacy import configuration as conf
from nnunet_fed.privacy import randomness
from nnunet_fed.privacy.adaptive import AdaptiveClip
from nnunet_fed.privacy.ledger import LEDGER_FILE, PrivacyLedger
from nnunet_fed.privacy.per_sample import CLIPPING as PER_SAMPLE_CLIPPING
from nnunet_fed.privacy.per_sample import METHODS as PER_SAMPLE_METHODS, PerSampleClipper, per_case_losses
from nnunet_fed.privacy.sampling import PoissonCaseLoader, split_batch
from nnunet_fed.privacy.sanitizer import DPSanitizer

STATE_KEY = "dp_state"
REPORT_FILE = "privacy_report.json"
SPLIT_KEY = b"nnunet_fed.split"

#: round metrics a DP site releases, and why each may leave the site (everything else stays in its own log)
RELEASED_METRICS = {
    "round": "public schedule",
    "local_steps": "public schedule",
    "dp_steps": "public schedule",
    "lr": "public schedule (nnU-Net's poly learning rate)",
    "delta": "public setting",
    "epsilon": "accountant output on the mechanisms of this ledger (post-processing)",
    "noise_multiplier": "calibrated from public settings and the sampling rate (post-processing)",
    "sampling_rate": "expected batch / noisy case count (post-processing)",
    "clip": "fixed: public setting; adaptive: moved by the noisy unclipped counts (post-processing)",
    "unclipped_fraction_noisy": "the last step's noisy unclipped count, released with that step (accounted)",
}
#: computed at a DP site, never released: its own log, progress.png, round state files
KEPT_AT_SITE = [
    "exact number of training cases", "training loss", "validation loss and pseudo-Dice (also with fold 'all')",
    "round timings (seconds, setup_seconds, process_seconds)", "per-case gradient norms", "exact unclipped counts",
    "nnU-Net's dataset fingerprint (dataset_fingerprint.json)", "checkpoint_best.pth is not written (it is chosen "
    "by the un-noised validation pseudo-Dice)", "fine-tuning losses", "nnU-Net's final validation (validation/)",
    "progress.png, training logs, debug.json, round state files (federated_rounds/)",
]
#: what a site states about itself at setup: declared public by whoever runs the site
SETUP_FIELDS = ["name", "plans", "dataset_json", *SHARED_DATASET_JSON_KEYS, "finished"]


def hash_split(identifiers, fold: int, num_folds: int = 5) -> tuple[list[str], list[str]]:
    """(training, validation) cases of ``fold``: a case is in validation fold ``blake2b(identifier) mod num_folds``
    (keyed with a fixed public key). Each case's fold depends on its own identifier only, so adding or removing a
    case never moves another between training and validation (nnU-Net's seeded KFold over the sorted cases moves
    many). Folds are about, not exactly, 1/num_folds of the cases."""
    def fold_of(case: str) -> int:
        digest = hashlib.blake2b(str(case).encode(), key=SPLIT_KEY, digest_size=8).digest()
        return int.from_bytes(digest, "big") % num_folds

    folds = {c: fold_of(c) for c in sorted(identifiers)}
    return [c for c, f in folds.items() if f != fold], [c for c, f in folds.items() if f == fold]


def noisy_count(n: int, scale: float, mechanism: str = "gaussian") -> float:
    """``n`` plus noise from OS entropy: ``N(0, scale^2)``, or Laplace of scale ``scale`` for the pure-epsilon
    mode. The release of a count (sensitivity 1 under add/remove) with noise multiplier ``scale``."""
    return float(n) + (randomness.laplace_scalar(scale) if mechanism == "laplace" else randomness.gaussian_scalar(scale))


def planning_release(site: str, plans: dict, public_plans: bool) -> dict:
    """What the plans a DP site trains with reveal about its data, for its ledger; refuses exact plans.

    nnU-Net's own plans (and federated plans from exact summaries) hold the site's foreground intensity
    percentiles, median spacing and shape and a batch size that depends on its number of cases, and they drive
    every case's preprocessing: one case would change every other case's input, which the per-case clip does not
    bound. Returns ``{"kind": "dp", "epsilon": e}`` for federated plans whose record lists this site's summary as
    released with epsilon ``e`` (Laplace, pure), ``{"kind": "public"}`` when ``public_plans`` is set, or
    ``{"kind": "not this site's data"}`` for federated plans made without this site. Raises ``BudgetError``."""
    fed = plans.get("federation") if isinstance(plans, dict) else None
    if public_plans:
        return {"kind": "public"}
    if not isinstance(fed, dict) or "sites" not in fed:
        raise acct.BudgetError(
            f"site {site}: its plans ({plans.get('plans_name', '?')}) come from nnU-Net's exact dataset fingerprint "
            f"(intensity percentiles, median shape and spacing, a batch size that depends on the number of cases), "
            f"which a differentially private run may not use: plan the sites with DP summaries (nnunet_fed simulate "
            f"--federated-planning --dp-epsilon E, or nnunet_fed site fingerprint --dp-epsilon E / plan / site "
            f"preprocess), or, if the plans were made on public data, declare them public with -o public_plans=true")
    entry = next((s for s in fed["sites"] if s.get("dataset_name") == site), None)
    if entry is None:
        return {"kind": "not this site's data"}
    eps = entry.get("dp_epsilon")
    if eps is None:
        raise acct.BudgetError(
            f"site {site}: the federated plans were made from its exact (non-private) summary; a differentially "
            f"private run needs DP summaries (--dp-epsilon at 'site fingerprint' or with --federated-planning), or "
            f"-o public_plans=true if you declare the plans public")
    return {"kind": "dp", "epsilon": float(eps)}


class nnUNetTrainerDPBase(nnUNetTrainerFederated):
    """Sample-level (training case) differential privacy for every round a site trains."""

    private = True
    option_choices = {"clipping": PER_SAMPLE_CLIPPING, "batch_rule": ("largest", "tan")}
    federated_options = {
        "target_epsilon": None,        # calibrate the noise to this epsilon (total, everything released)
        "target_delta": 1e-5,
        "noise_multiplier": None,      # or fix the (effective) noise multiplier yourself
        "max_grad_norm": 1.0,          # clipping threshold C (initial threshold when adaptive)
        "sampling_rate": None,         # q: probability that a case is in a logical batch ...
        "expected_batch_size": None,   # ... or q = expected_batch_size / noisy case count (default: batch_rule)
        "batch_rule": "largest",       # neither set, target_epsilon set: largest (min(max_expected_batch, N~/2)) |
                                       # tan (Sander et al.) (privacy/configuration); noise_multiplier set: nnU-Net's
        "max_expected_batch": 256.0,   # the largest expected logical batch the rules consider (compute per step)
        "adaptive_clip": False,        # private quantile clipping (Andrew et al. 2021)
        "target_quantile": 0.5,
        "clip_lr": 0.2,
        "count_noise_multiplier": None,  # noise of the unclipped count (default max(qN~/20, sigma))
        "noise_decay": 1.0,            # noise multiplier of round r: sigma_0 * noise_decay**r
        "accountant": "rdp",           # rdp | prv
        "mechanism": "gaussian",       # gaussian (L2 clip) | laplace (L1 clip, pure epsilon)
        "max_noise_multiplier": 50.0,  # refuse targets that would need more noise than this
        "per_sample_method": "auto",   # auto | hooks | loop: how exact per-case gradients are computed (same result)
        "clipping": "flat",            # flat: min(1, C/||g||) | automatic: C/(||g|| + 0.01), normalised (Bu et al.)
        "augmentation_multiplicity": 1,  # K augmented patches per sampled case, averaged before clipping (De et al.)
        "case_count_noise": 10.0,      # std (Laplace: scale) of the noise on the released number of training cases
        "public_plans": False,         # the plans are public (made on public data): not counted, not refused
    }

    @classmethod
    def resolve_options(cls, options=None, environ=None) -> dict:
        o = super().resolve_options(options, environ)
        if o["target_epsilon"] is not None and not (float(o["target_epsilon"]) > 0 and np.isfinite(o["target_epsilon"])):
            raise acct.BudgetError(f"{cls.__name__}: target_epsilon must be a positive number, got {o['target_epsilon']}")
        if not (o["case_count_noise"] > 0 and np.isfinite(o["case_count_noise"])):
            raise acct.BudgetError(f"{cls.__name__}: case_count_noise must be > 0, got {o['case_count_noise']}")
        if o["clipping"] == "automatic" and o["adaptive_clip"]:
            raise acct.BudgetError(f"{cls.__name__}: clipping=automatic normalises every case's gradient, so there "
                                   f"is no clip to adapt; set adaptive_clip=false (adaptive clipping is for "
                                   f"clipping=flat)")
        if o["clipping"] == "automatic" and str(o["mechanism"]).lower() == "laplace":
            raise acct.BudgetError(f"{cls.__name__}: clipping=automatic needs the Gaussian mechanism (L2 norms)")
        if o["batch_rule"] == "tan" and (o["target_epsilon"] is None or o["noise_multiplier"] is not None
                                         or o["sampling_rate"] is not None or o["expected_batch_size"] is not None):
            raise acct.BudgetError(f"{cls.__name__}: batch_rule=tan chooses the sampling rate and the noise from "
                                   f"target_epsilon; set target_epsilon and none of noise_multiplier, sampling_rate, "
                                   f"expected_batch_size")
        if o["augmentation_multiplicity"] < 1:
            raise ValueError(f"{cls.__name__}: augmentation_multiplicity must be >= 1, got "
                             f"{o['augmentation_multiplicity']}")
        return o

    @classmethod
    def check_site_setup(cls, site_name: str, plans: dict, options=None) -> None:
        """Before anything is written: the site's plans must be private or public (``planning_release``)."""
        super().check_site_setup(site_name, plans, options)
        planning_release(site_name, plans, bool(cls.resolve_options(options)["public_plans"]))

    # ------------------------------------------------------------------ setup
    def _dp_configure(self) -> None:
        """Validate the DP options and set up the accountant state, once (the data loaders may be built before
        ``initialize``, e.g. for the simulation's augmentation pool)."""
        if getattr(self, "_dp_configured", False):
            return
        o = self.options
        self.dp_mechanism = str(o["mechanism"]).lower()
        if self.dp_mechanism not in acct.MECHANISMS:
            raise acct.BudgetError(f"mechanism={o['mechanism']!r}: choose one of {acct.MECHANISMS}")
        if str(o["accountant"]).lower() not in acct.ACCOUNTANTS:
            raise acct.BudgetError(f"accountant={o['accountant']!r}: choose one of {acct.ACCOUNTANTS}")
        if o["target_epsilon"] is None and o["noise_multiplier"] is None:
            raise acct.BudgetError(f"{type(self).__name__}: set target_epsilon (the noise is calibrated to it) or "
                                   f"noise_multiplier (e.g. -o target_epsilon=8, or nnUNet_fed_target_epsilon=8)")
        if not o["max_grad_norm"] > 0:
            raise acct.BudgetError(f"max_grad_norm must be > 0, got {o['max_grad_norm']}")
        if o["sampling_rate"] is not None and o["expected_batch_size"] is not None:
            raise acct.BudgetError("set sampling_rate or expected_batch_size, not both")
        if str(o["per_sample_method"]).lower() not in PER_SAMPLE_METHODS:
            raise ValueError(f"per_sample_method={o['per_sample_method']!r}: choose one of "
                             f"{', '.join(PER_SAMPLE_METHODS)}")
        self.dp_multiplicity = int(o["augmentation_multiplicity"])
        self.dp_planning = planning_release(self.site_name, self.plans_manager.plans, bool(o["public_plans"]))
        self.dp_clip = float(o["max_grad_norm"])
        self.dp_history: list[list] = []
        self.dp_steps = 0
        self.dp_last_fraction = None
        self.dp_round_steps: list[int] = []  # cumulative steps after each round (ledger)
        self.dp_round_epsilons: list[float] = []
        self.dp_noisy_num_cases: float | None = None  # released once per run (noisy_case_count)
        self._dp_configured = True

    def initialize(self):
        super().initialize()
        self.grad_scaler = None  # float32 DP steps (see module docstring)
        self._dp_configure()
        method = str(self.options["per_sample_method"]).lower()
        self.dp_clipper = PerSampleClipper(self.plain_network, norm_type=1.0 if self.dp_mechanism == "laplace" else 2.0,
                                           method=method, clipping=str(self.options["clipping"]).lower())
        self.dp_sanitizer = DPSanitizer(self.dp_clipper, self.dp_mechanism)

    @property
    def dp_delta(self) -> float:
        return 0.0 if self.dp_mechanism == "laplace" else float(self.options["target_delta"])

    # ------------------------------------------------------------------ what depends on the number of cases
    def noisy_case_count(self, num_cases: int) -> float:
        """``N~ = N + noise``, released once per run (sensitivity 1): drawn at the first call of a fresh run and
        written to the site's ledger before anything is released; a resumed run (``resuming``) or a checkpoint
        loaded before the loaders are built reuses it."""
        if self.dp_noisy_num_cases is None and self.resuming:
            path = os.path.join(self.output_folder, LEDGER_FILE)
            if os.path.isfile(path):
                self.dp_noisy_num_cases = PrivacyLedger.load(path).noisy_num_cases()
        if self.dp_noisy_num_cases is None:
            self.dp_noisy_num_cases = noisy_count(num_cases, float(self.options["case_count_noise"]),
                                                  self.dp_mechanism)
            if self.local_rank == 0:
                os.makedirs(self.output_folder, exist_ok=True)
                self.privacy_ledger().write(self.output_folder)
        return self.dp_noisy_num_cases

    def _sampling(self, noisy_cases: float) -> tuple[float, float]:
        """(q, expected logical batch = the divisor) from the noisy case count and public options only."""
        o = self.options
        if o["sampling_rate"] is not None:
            q = float(o["sampling_rate"])
            if not 0 < q <= 1:
                raise acct.BudgetError(f"site {self.site_name}: sampling_rate must lie in (0, 1], got {q:g}")
            return q, max(q * noisy_cases, 1.0)
        if o["expected_batch_size"] is not None or o["target_epsilon"] is None or o["noise_multiplier"] is not None:
            b = float(o["expected_batch_size"]) if o["expected_batch_size"] is not None else float(self.batch_size)
            if not b > 0:
                raise acct.BudgetError(f"expected_batch_size must be > 0, got {b:g}")
            return conf.sampling_rate(b, noisy_cases), b
        if o["batch_rule"] == "tan":  # (resolve_options refuses tan with a batch, a sampling rate or a noise)
            self.dp_configuration = conf.choose_expected_batch(
                float(o["target_epsilon"]), self.dp_delta, noisy_cases, self.batch_size, self.num_iterations_per_epoch,
                self.num_epochs, float(o["max_expected_batch"]), accountant=str(o["accountant"]).lower(),
                mechanism=self.dp_mechanism, decay=float(o["noise_decay"]), extra_steps=int(self.post_round_steps()),
                events=self.dp_events(), max_noise_multiplier=float(o["max_noise_multiplier"]))
        else:
            self.dp_configuration = conf.largest_batch_configuration(self.batch_size, noisy_cases,
                                                                     float(o["max_expected_batch"]))
        self.print_to_log_file(f"DP configuration: {self.dp_configuration['reason']}; B = "
                               f"{self.dp_configuration['expected_batch_size']:g}, q = "
                               f"{self.dp_configuration['sampling_rate']:.4g}")
        return self.dp_configuration["sampling_rate"], self.dp_configuration["expected_batch_size"]

    def fedavg_weight(self) -> int:
        return max(1, int(round(self.dp_noisy_num_cases)))

    @staticmethod
    def per_case_split(site_name: str, preprocessed_dataset_folder_base: str, data_folder: str, fold):
        """``(training, validation)`` of ``fold`` by ``hash_split``, or ``None`` where nnU-Net's own split applies
        (fold 'all', or a ``splits_final.json`` that differs from nnU-Net's automatic split: yours). The training
        cases never depend on how many cases the site has (a site too small for nnU-Net's 5-fold split is split
        the same way). A fold with no validation case validates on its training cases (as fold 'all' does:
        validation stays at the site); a fold with no training case raises ``FederationSetupError``."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from nnunet_fed.sites import FederationSetupError

        if fold == "all":
            return None
        cases = sorted(infer_dataset_class(data_folder).get_identifiers(data_folder))
        splits_file = os.path.join(preprocessed_dataset_folder_base, "splits_final.json")
        if os.path.isfile(splits_file) and load_json(splits_file) != generate_crossval_split(cases, 12345, 5):
            return None
        if not 0 <= int(fold) < 5:
            raise FederationSetupError(f"site {site_name}: fold {fold} is not one of 0-4 or 'all'")
        tr, val = hash_split(cases, int(fold))
        if not tr:
            raise FederationSetupError(
                f"site {site_name}: fold {fold} of the per-case split has no training case (all its {len(cases)} "
                f"cases hash to validation fold {fold}); use another fold, -f all, or a splits_final.json")
        return tr, (val or list(tr))

    @classmethod
    def check_site_split(cls, site_name: str, plans: dict, configuration: str, fold) -> None:
        base = os.path.join(os.environ["nnUNet_preprocessed"], site_name)
        data_id = plans["configurations"][configuration].get("data_identifier")
        if data_id and os.path.isdir(os.path.join(base, data_id)):
            cls.per_case_split(site_name, base, os.path.join(base, data_id), fold)

    def do_split(self):
        """nnU-Net's split, except that its automatic 5-fold split (seeded KFold over the sorted cases, where one
        case more moves others between training and validation) is replaced by ``hash_split``
        (``per_case_split``). A splits file that differs from nnU-Net's automatic split is yours and is used as it
        is (assign each case by something of its own, e.g. the patient)."""
        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        split = self.per_case_split(self.site_name, self.preprocessed_dataset_folder_base,
                                    self.preprocessed_dataset_folder, self.fold)
        if split is None:
            return super().do_split()
        tr, val = split
        same = " (no case in its validation fold: it validates on its training cases)" if val == tr else ""
        self.print_to_log_file(f"per-case split (hash of each case's identifier): fold {self.fold} has {len(tr)} "
                               f"training and {len(val)} validation cases{same}")
        return tr, val

    def get_dataloaders(self):
        """nnU-Net's loaders, with the training loader replaced by Poisson sampling of cases."""
        self._dp_configure()
        mt_tr, mt_val = super().get_dataloaders()
        old = mt_tr.generator if hasattr(mt_tr, "generator") else mt_tr.data_loader
        if isinstance(mt_tr, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
            mt_tr._finish()
        self.dp_num_cases = len(old._data.identifiers)  # exact: stays at the site
        self.dp_sample_rate, self.dp_expected_batch = self._sampling(self.noisy_case_count(self.dp_num_cases))
        initial_patch_size = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[2]
        dl = PoissonCaseLoader(old._data, self.batch_size, initial_patch_size, self.configuration_manager.patch_size,
                               self.label_manager, oversample_foreground_percent=self.oversample_foreground_percent,
                               transforms=old.transforms, sample_rate=self.dp_sample_rate,
                               multiplicity=self.dp_multiplicity)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            mt_tr = SingleThreadedAugmenter(dl, None)
        else:
            mt_tr = NonDetMultiThreadedAugmenter(data_loader=dl, transform=None, num_processes=n_proc,
                                                 num_cached=max(6, n_proc // 2), seeds=None,
                                                 pin_memory=self.device.type == "cuda", wait_time=0.002)
        return mt_tr, mt_val

    def on_train_start(self):
        super().on_train_start()
        self._calibrate()

    def dp_events(self) -> list[list]:
        """The site's single releases as accountant events: its planning summary (if the plans come from it) and
        its noisy case count."""
        events = []
        if self.dp_planning["kind"] == "dp":
            events.append(["laplace", 1.0 / self.dp_planning["epsilon"], 1.0, 1])
        events.append([self.dp_mechanism, float(self.options["case_count_noise"]), 1.0, 1])
        return events

    def _calibrate(self) -> None:
        o = self.options
        q, rounds, steps = self.dp_sample_rate, self.num_epochs, self.num_iterations_per_epoch
        accountant, decay = str(o["accountant"]).lower(), float(o["noise_decay"])
        extra = int(self.post_round_steps())  # e.g. local fine-tuning: private too, counted in the same budget
        events = self.dp_events()
        if o["noise_multiplier"] is not None:
            self.dp_sigma0 = float(o["noise_multiplier"])
            if not self.dp_sigma0 > 0:
                raise acct.BudgetError(f"noise_multiplier must be > 0, got {self.dp_sigma0}")
            planned = acct.epsilon(acct.planned_schedule(self.dp_sigma0, q, steps, rounds, decay, extra),
                                   self.dp_delta, accountant, self.dp_mechanism, events)
            if o["target_epsilon"] is not None and planned > float(o["target_epsilon"]) * 1.0001:
                raise acct.BudgetError(
                    f"site {self.site_name}: noise_multiplier={self.dp_sigma0:g} over {rounds} rounds x {steps} steps"
                    f"{f' + {extra} fine-tuning steps' if extra else ''} (sampling rate {q:.4g}) would reach epsilon "
                    f"{planned:.4g} > target_epsilon={o['target_epsilon']:g}")
        else:
            try:
                self.dp_sigma0 = acct.calibrate(float(o["target_epsilon"]), self.dp_delta, q, steps, rounds,
                                                accountant, self.dp_mechanism, decay, float(o["max_noise_multiplier"]),
                                                extra_steps=extra, events=events)
            except acct.BudgetError as e:
                raise acct.BudgetError(f"site {self.site_name}: {e}") from None
            planned = acct.epsilon(acct.planned_schedule(self.dp_sigma0, q, steps, rounds, decay, extra),
                                   self.dp_delta, accountant, self.dp_mechanism, events)
        self.dp_planned_epsilon = planned
        self.dp_configuration = {
            **(getattr(self, "dp_configuration", None) or {"rule": "set by the user"}),
            **conf.schedule_configuration(self.dp_sigma0, o["target_epsilon"], rounds, steps, extra, self.initial_lr,
                                          accountant, o["noise_multiplier"] is not None)}
        self.dp_adaptive = None
        if o["adaptive_clip"]:
            last = rounds if extra else rounds - 1  # the fine-tuning steps run at round ``rounds``'s noise
            sigma_max = self.dp_sigma0 * max(1.0, decay ** last)
            count = o["count_noise_multiplier"]
            count = float(count) if count is not None else max(self.dp_expected_batch / 20.0, sigma_max)
            self._split_noise(self.dp_sigma0, count)  # refuses a count noise too small for the budget
            self._split_noise(self.dp_sigma0 * decay ** last, count)
            self.dp_adaptive = AdaptiveClip(float(o["max_grad_norm"]), float(o["target_quantile"]), float(o["clip_lr"]),
                                            count, self.dp_mechanism)
            self.dp_adaptive.clip = self.dp_clip
        plans_note = {"dp": f"planning summary epsilon {self.dp_planning.get('epsilon', 0):g}",
                      "public": "plans declared public", "not this site's data": "plans made without this site"}
        self.print_to_log_file(
            f"DP ({self.dp_mechanism}, {accountant}): unit = training case (add/remove), {self.dp_num_cases} cases "
            f"(released: {self.dp_noisy_num_cases:.1f}, noise {float(o['case_count_noise']):g}), sampling rate {q:.4g} "
            f"(expected logical batch {self.dp_expected_batch:.2f}, physical batch {self.batch_size}), noise "
            f"multiplier {self.dp_sigma0:.4g} (decay {decay:g}/round), {rounds} rounds x {steps} steps"
            f"{f' + {extra} fine-tuning steps' if extra else ''}, clip {self.dp_clip:.4g}"
            f"{' adaptive' if self.dp_adaptive else ''}, clipping {o['clipping']}, augmentation multiplicity "
            f"{self.dp_multiplicity}, {plans_note[self.dp_planning['kind']]}; planned total "
            f"epsilon {planned:.4g} at delta {self.dp_delta:g}")

    def _split_noise(self, sigma: float, count: float | None) -> float:
        """Gradient noise multiplier leaving ``sigma`` in total once the unclipped count is released too."""
        if self.dp_mechanism == "laplace":
            return acct.laplace_count_scale_split(sigma, count)
        return acct.gradient_noise_multiplier(sigma, count)

    # ------------------------------------------------------------------ the step
    def _round_sigma(self) -> float:
        return self.dp_sigma0 * float(self.options["noise_decay"]) ** self.current_epoch

    def _per_sample_losses(self, target):
        """nnU-Net's loss (``self.loss``: the fine-tuning may swap in PBL) of each case of a physical batch."""
        return per_case_losses(self.loss, target)

    def train_step(self, batch: dict) -> dict:
        randomness.use_entropy_in_this_process()  # per-case randomness of the loss (e.g. PBL's noise)
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.dp_clip

        def physical_batches():
            for data, target in split_batch(batch, self.batch_size, self.dp_multiplicity) if batch["keys"] else ():
                data = data.to(self.device, non_blocking=True)
                target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
                    else target.to(self.device, non_blocking=True)
                yield data, self._per_sample_losses(target)

        sigma = self._round_sigma()
        count_noise = self.dp_adaptive.count_noise_multiplier if self.dp_adaptive else None
        out = self.dp_sanitizer.step(physical_batches(), clip, self._split_noise(sigma, count_noise) * clip,
                                     self.dp_expected_batch, self.dp_multiplicity)
        sampled, unclipped, loss_sum = out["sampled"], out["unclipped"], out["loss_sum"]
        self.optimizer.step()
        if self.dp_adaptive is not None:
            self.dp_clip = self.dp_adaptive.update(unclipped, sampled, self.dp_expected_batch)
            self.dp_last_fraction = self.dp_adaptive.last_unclipped_fraction
        self.dp_history = acct._merge(self.dp_history + [[sigma, self.dp_sample_rate, 1]])
        self.dp_steps += 1
        # nnU-Net logs the mean training loss locally (it never leaves the site: see RELEASED_METRICS)
        return {"loss": np.array(loss_sum / sampled if sampled else np.nan)}

    def on_train_epoch_end(self, train_outputs):
        losses = [o["loss"] for o in train_outputs if np.isfinite(o["loss"])]
        super().on_train_epoch_end([{"loss": np.array(np.mean(losses) if losses else np.nan)}])

    # ------------------------------------------------------------------ accounting and reports
    def privacy_spent(self) -> float:
        """Total epsilon so far: the single releases and every step taken."""
        return acct.epsilon(self.dp_history, self.dp_delta, str(self.options["accountant"]).lower(), self.dp_mechanism,
                            self.dp_events())

    def round_metrics(self) -> dict:
        metrics = super().round_metrics()  # the site's own record (logged); release_metrics filters what leaves
        if not self.dp_round_steps or self.dp_round_steps[-1] != self.dp_steps:
            self.dp_round_steps.append(self.dp_steps)
            self.dp_round_epsilons.append(self.privacy_spent())
        metrics.update({
            "epsilon": self.dp_round_epsilons[-1], "delta": self.dp_delta,
            "noise_multiplier": self._round_sigma_of(self.current_epoch - 1),
            "sampling_rate": self.dp_sample_rate, "clip": self.dp_clip, "dp_steps": self.dp_steps,
        })
        if self.dp_adaptive is not None and self.dp_last_fraction is not None:
            metrics["unclipped_fraction_noisy"] = float(self.dp_last_fraction)
        return metrics

    def release_metrics(self, metrics: dict) -> dict:
        """Only ``RELEASED_METRICS`` leave the site; the rest goes to the site's own log."""
        kept = {k: v for k, v in metrics.items() if k not in RELEASED_METRICS}
        if kept:
            self.print_to_log_file(f"kept at the site (not released): {kept}", also_print_to_console=False)
        return {k: v for k, v in metrics.items() if k in RELEASED_METRICS}

    def on_round_end(self):
        update = super().on_round_end()
        if self.local_rank == 0:
            self.privacy_ledger().write(self.output_folder)  # before the update leaves the site
        return update

    def _round_sigma_of(self, r: int) -> float:
        return self.dp_sigma0 * float(self.options["noise_decay"]) ** max(r, 0)

    def privacy_ledger(self) -> PrivacyLedger:
        """Everything this site releases in this run (see ``nnunet_fed.privacy.ledger``)."""
        o = self.options
        accountant = str(o["accountant"]).lower()
        ledger = PrivacyLedger(site=self.site_name, mechanism=self.dp_mechanism, accountant=accountant,
                               delta=self.dp_delta, history=[list(h) for h in self.dp_history],
                               round_steps=list(self.dp_round_steps), round_epsilons=list(self.dp_round_epsilons),
                               kept_at_site=list(KEPT_AT_SITE))
        plan = self.dp_planning
        if plan["kind"] == "dp":
            event = ["laplace", 1.0 / plan["epsilon"], 1.0, 1]
            ledger.events.append(event)
            ledger.release("planning", "fingerprint summary (counts, geometry histograms, intensity sketch)",
                           "server (merged into the shared plans)", "laplace", sensitivity="see the summary's dp "
                           "record (L1, one case)", epsilon=ledger.event_epsilon(event), event=event,
                           fields=["plans"])
        else:
            ledger.release("planning", "plans", "server and every model folder",
                           "declared public" if plan["kind"] == "public" else "not derived from this site's data",
                           fields=["plans"])
        count_event = [self.dp_mechanism, float(o["case_count_noise"]), 1.0, 1]
        ledger.events.append(count_event)
        noisy = self.dp_noisy_num_cases
        ledger.release("case count", "noisy number of training cases", "server (FedAvg weight), round metrics",
                       self.dp_mechanism, sensitivity=1, noise=float(o["case_count_noise"]), value=noisy,
                       epsilon=ledger.event_epsilon(count_event), event=count_event,
                       fields=["num_examples", "num-examples", "sampling_rate", "noisy_num_training_cases"])
        per_step = {"gaussian": "Poisson-subsampled Gaussian", "laplace": "Poisson-subsampled Laplace (pure)"}
        ledger.release("training", "round updates (shared parameters after each round)", "server",
                       per_step[self.dp_mechanism], sensitivity=f"{'L1' if self.dp_mechanism == 'laplace' else 'L2'} "
                       f"per-case clip C (adaptive: with the unclipped count, one mechanism)",
                       steps=self.dp_steps, fields=["arrays"])
        extra = int(self.post_round_steps())
        if extra:
            ledger.release("fine-tuning", f"{extra} local steps after the rounds (the personal model)",
                           "the site's checkpoint_final.pth", per_step[self.dp_mechanism],
                           sensitivity="per-case clip C", steps=extra, note="counted in the same history")
        ledger.release("round metrics", "metrics of every round", "server (federation_metrics.jsonl)",
                       "post-processing of the releases above, or public", fields=sorted(RELEASED_METRICS),
                       why=dict(RELEASED_METRICS))
        ledger.release("models", "checkpoint_final.pth (weights, plans, dataset description, accountant state)",
                       "the site's and the federation's model folders", "post-processing of the releases above",
                       fields=["network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes",
                               "current_epoch", "optimizer_state", STATE_KEY, "checkpoint_final.pth", "plans.json",
                               "dataset.json", REPORT_FILE, LEDGER_FILE])
        ledger.release("setup", "site name, plans, dataset description (channel names, labels, file ending)",
                       "server", "declared public", fields=list(SETUP_FIELDS))
        from dataclasses import fields as dataclass_fields

        from nnunet_fed.federation.simulation import SimulationConfig

        ledger.release("federation records", "the server's records of the run: round metrics as above, the global "
                       "weights, the server rule's state (a server optimiser's moments), update norms and cosines "
                       "with --diagnose, the run's settings", "server (the federation's folder)",
                       "post-processing of the releases above, or the run's (public) settings",
                       fields=["federation_metrics.jsonl", "federation_progress.png", "federation_state.pth",
                               "federation_config.json", "round", "sites", "rejected", "failed", "completed_rounds",
                               "global_arrays", "run_config", "strategy_state", "update_geometry",
                               *[f.name for f in dataclass_fields(SimulationConfig)]])
        from nnunet_fed.deployment.secure_aggregation import SITE_RELEASES

        for quantity, names, relation in SITE_RELEASES:  # a secure round's replies instead of the update in the clear
            ledger.release("secure aggregation", quantity, "server (with --secure-aggregation: Flower's SecAgg+; the "
                           "encrypted shares are relayed to the other sites)", relation, fields=list(names))
        ledger.release("server-observed timing", "how long the site takes to answer a round (the 'seconds' of a "
                       "round in the federation records)", "server", "not privatised: it grows with the "
                       "Poisson-sampled batch sizes (a caveat of every deployment: the server sees when a reply "
                       "arrives)", fields=["seconds"])
        return ledger

    def privacy_report(self) -> dict:
        o = self.options
        return {
            "unit": "training case (Poisson-sampled; one patch per sampled case per step, or augmentation_multiplicity "
                    "patches whose gradients are averaged before clipping); add/remove adjacency",
            "site": self.site_name, "mechanism": self.dp_mechanism, "accountant": str(o["accountant"]).lower(),
            "epsilon": self.privacy_spent(), "delta": self.dp_delta, "planned_epsilon": self.dp_planned_epsilon,
            "epsilon_covers": "planning summary (if any), noisy case count, every training and fine-tuning step",
            "target_epsilon": o["target_epsilon"], "noisy_num_training_cases": self.dp_noisy_num_cases,
            "case_count_noise": float(o["case_count_noise"]), "plans": self.dp_planning,
            "sampling_rate": self.dp_sample_rate, "expected_batch_size": self.dp_expected_batch,
            "physical_batch_size": self.batch_size, "steps": self.dp_steps,
            "rounds": self.num_epochs, "local_steps": self.num_iterations_per_epoch,
            "steps_after_rounds": int(self.post_round_steps()),  # local fine-tuning, DP steps too
            "noise_multiplier": self.dp_sigma0, "noise_decay": float(o["noise_decay"]),
            "clip_norm": "L1" if self.dp_mechanism == "laplace" else "L2", "clipping": str(o["clipping"]),
            "augmentation_multiplicity": self.dp_multiplicity,
            "configuration": self.dp_configuration,
            "adaptive_clip": bool(self.dp_adaptive), "initial_clip": float(o["max_grad_norm"]), "final_clip": self.dp_clip,
            "count_noise_multiplier": self.dp_adaptive.count_noise_multiplier if self.dp_adaptive else None,
            "target_quantile": float(o["target_quantile"]) if self.dp_adaptive else None,
            # single releases [mechanism, noise multiplier, q, count] and the training history (noise multiplier,
            # sampling rate, steps): replay with any accountant to check epsilon
            "events": self.dp_events(),
            "history": self.dp_history,
        }

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            path = os.path.join(self.output_folder, REPORT_FILE)
            rep = self.privacy_report()
            with open(path + ".tmp", "w") as f:
                json.dump(rep, f, indent=2)
            os.replace(path + ".tmp", path)
            self.privacy_ledger().write(self.output_folder)
            self.print_to_log_file(f"privacy: total epsilon {rep['epsilon']:.4g} at delta {rep['delta']:g} after "
                                   f"{rep['steps']} steps ({path}; every release: {LEDGER_FILE})")

    # ------------------------------------------------------------------ checkpoints
    def keeps_checkpoint(self, filename: str) -> bool:
        """checkpoint_best.pth is not written: it would be chosen by the un-noised validation pseudo-Dice."""
        return os.path.basename(filename) != "checkpoint_best.pth"

    def checkpoint_contents(self, filename: str, checkpoint: dict) -> dict:
        """The final model carries accounted values only: no training log (losses, pseudo-Dice), no best-EMA,
        a dataset description without case counts or file lists."""
        if os.path.basename(filename) == "checkpoint_final.pth":
            checkpoint = {k: v for k, v in checkpoint.items() if k not in ("logging", "_best_ema")}
            args = dict(checkpoint["init_args"])
            args["dataset_json"] = shared_dataset_json(args["dataset_json"])
            checkpoint["init_args"] = args
        return checkpoint

    def extra_checkpoint_state(self) -> dict:
        state = super().extra_checkpoint_state()
        state[STATE_KEY] = {"history": [list(h) for h in self.dp_history], "clip": float(self.dp_clip),
                            "steps": int(self.dp_steps), "last_fraction": self.dp_last_fraction,
                            "noisy_num_cases": self.dp_noisy_num_cases, "round_steps": list(self.dp_round_steps),
                            "round_epsilons": list(self.dp_round_epsilons)}
        return state

    def carry_over_released(self, attempt_checkpoint: dict) -> None:
        """The round is trained again from another global model after an earlier attempt whose update already left
        the site: that attempt's steps stay in the accountant history, and the retry is refused if the rest of the
        schedule would then pass ``target_epsilon``. (A repeat from the same global model re-sends the earlier
        update instead and spends nothing: see the Flower ClientApp.)"""
        super().carry_over_released(attempt_checkpoint)
        state = attempt_checkpoint.get(STATE_KEY)
        if state is None or int(state["steps"]) <= self.dp_steps:
            return
        self._load_dp_state(state)
        o = self.options
        decay = float(o["noise_decay"])
        rest = [[self.dp_sigma0 * decay ** r, self.dp_sample_rate, self.num_iterations_per_epoch]
                for r in range(self.current_epoch, self.num_epochs)]
        if self.post_round_steps():
            rest.append([self.dp_sigma0 * decay ** self.num_epochs, self.dp_sample_rate, int(self.post_round_steps())])
        total = acct.epsilon(self.dp_history + rest, self.dp_delta, str(o["accountant"]).lower(), self.dp_mechanism,
                             self.dp_events())
        if o["target_epsilon"] is not None and total > float(o["target_epsilon"]) * 1.0001:
            raise acct.BudgetError(
                f"site {self.site_name}: round {self.current_epoch + 1} was trained before and its update sent, from "
                f"another global model; training it again would bring the total epsilon to {total:.4g}, above "
                f"target_epsilon={o['target_epsilon']:g}: refused")
        self.print_to_log_file(f"round retried from another global model: the earlier attempt's {self.dp_steps} "
                               f"accounted steps stay counted (planned total epsilon {total:.4g})")

    def _load_dp_state(self, state: dict) -> None:
        self.dp_history = [[float(s), float(q), int(n)] for s, q, n in state["history"]]
        self.dp_steps = int(state["steps"])
        self.dp_round_steps = [int(s) for s in state.get("round_steps", [])]
        self.dp_round_epsilons = [float(e) for e in state.get("round_epsilons", [])]
        noisy = state.get("noisy_num_cases")
        if noisy is not None and self.dp_noisy_num_cases is not None and float(noisy) != self.dp_noisy_num_cases:
            raise RuntimeError(f"site {self.site_name}: the checkpoint's released case count {noisy} differs from "
                               f"this run's {self.dp_noisy_num_cases} (a state file of another run?)")
        if noisy is not None:
            self.dp_noisy_num_cases = float(noisy)

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        super().load_extra_checkpoint_state(checkpoint)
        state = checkpoint.get(STATE_KEY)
        if state is None:
            return
        self._load_dp_state(state)
        self.dp_clip = float(state["clip"])
        self.dp_last_fraction = state.get("last_fraction")
        if getattr(self, "dp_adaptive", None) is not None:
            self.dp_adaptive.clip = self.dp_clip
