"""DP-SGD inside nnU-Net's training loop: the trainer base of nnUNetTrainerDP, nnUNetTrainerFedDP, nnUNetTrainerFedADP.

Each of nnU-Net's iterations becomes one *logical* DP-SGD step:

1. a Poisson-sampled logical batch (every training case with probability ``q``, one patch each, nnU-Net's
   augmentation; ``sampling.PoissonCaseLoader``);
2. in physical batches of nnU-Net's batch size: exact per-sample gradients of nnU-Net's loss (Dice + CE, deep
   supervision), each clipped to ``C`` (L2; L1 in Laplace mode) and summed (``per_sample.PerSampleClipper``);
3. noise added once: ``N(0, (sigma_g C)^2)`` per coordinate (Laplace ``b_g C`` in Laplace mode), the sum divided by
   the expected logical batch size ``q N`` (also for an empty batch, which releases noise only);
4. nnU-Net's optimizer step (SGD, momentum, poly learning rate; FedProx's proximal term if set);
5. with adaptive clipping, the noisy count of unclipped cases moves ``C`` (``adaptive.AdaptiveClip``);
6. the accountant records (sigma, q, 1 step).

The noise multiplier is calibrated before training from (target_epsilon, target_delta) and the whole schedule
(rounds x local steps, ``q``, optional decay over rounds); a target the schedule cannot meet is refused with
the epsilon it would reach. The accountant history, the threshold and the step count live in every checkpoint,
so the accounting continues across rounds, resumes and processes. Each round's metrics carry the site's
(epsilon, delta) so far, and ``privacy_report.json`` in the site's fold folder holds the final report.

AMP: nnU-Net trains with autocast + GradScaler on CUDA; DP steps run in float32 (per-sample gradients and their
norms in half precision would need per-sample loss scaling), validation keeps autocast.
"""
from __future__ import annotations

import json
import os

import numpy as np
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_fed.federation.trainer import nnUNetTrainerFederated
from nnunet_fed.privacy import accountant as acct
from nnunet_fed.privacy.adaptive import AdaptiveClip
from nnunet_fed.privacy.per_sample import METHODS as PER_SAMPLE_METHODS, PerSampleClipper, per_case_losses
from nnunet_fed.privacy.sampling import PoissonCaseLoader, split_batch
from nnunet_fed.privacy.sanitizer import DPSanitizer

STATE_KEY = "dp_state"


class nnUNetTrainerDPBase(nnUNetTrainerFederated):
    """Sample-level (training case) differential privacy for every round a site trains."""

    federated_options = {
        "target_epsilon": None,        # calibrate the noise to this epsilon over the whole schedule
        "target_delta": 1e-5,
        "noise_multiplier": None,      # or fix the (effective) noise multiplier yourself
        "max_grad_norm": 1.0,          # clipping threshold C (initial threshold when adaptive)
        "sampling_rate": None,         # q: probability that a case is in a logical batch ...
        "expected_batch_size": None,   # ... or q = expected_batch_size / training cases (default: nnU-Net's batch size)
        "adaptive_clip": False,        # private quantile clipping (Andrew et al. 2021)
        "target_quantile": 0.5,
        "clip_lr": 0.2,
        "count_noise_multiplier": None,  # noise of the unclipped count (default max(qN/20, sigma))
        "noise_decay": 1.0,            # noise multiplier of round r: sigma_0 * noise_decay**r
        "accountant": "rdp",           # rdp | prv
        "mechanism": "gaussian",       # gaussian (L2 clip) | laplace (L1 clip, pure epsilon)
        "max_noise_multiplier": 50.0,  # refuse targets that would need more noise than this
        "per_sample_method": "auto",   # auto | hooks | loop: how exact per-case gradients are computed (same result)
    }

    # ------------------------------------------------------------------ setup
    def initialize(self):
        super().initialize()
        self.grad_scaler = None  # float32 DP steps (see module docstring)
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
        method = str(o["per_sample_method"]).lower()
        if method not in PER_SAMPLE_METHODS:
            raise ValueError(f"per_sample_method={o['per_sample_method']!r}: choose one of "
                             f"{', '.join(PER_SAMPLE_METHODS)}")
        self.dp_clipper = PerSampleClipper(self.plain_network, norm_type=1.0 if self.dp_mechanism == "laplace" else 2.0,
                                           method=method)
        self.dp_sanitizer = DPSanitizer(self.dp_clipper, self.dp_mechanism)
        self.dp_clip = float(o["max_grad_norm"])
        self.dp_history: list[list] = []
        self.dp_steps = 0
        self.dp_last_fraction = None

    @property
    def dp_delta(self) -> float:
        return 0.0 if self.dp_mechanism == "laplace" else float(self.options["target_delta"])

    def _sample_rate(self, num_cases: int) -> float:
        o = self.options
        if o["sampling_rate"] is not None:
            q = float(o["sampling_rate"])
        else:
            expected = float(o["expected_batch_size"]) if o["expected_batch_size"] is not None else self.batch_size
            q = expected / num_cases
        if not 0 < q <= 1:
            raise acct.BudgetError(f"site {self.site_name}: sampling rate {q:.4g} is not in (0, 1] "
                                   f"({num_cases} training cases); lower expected_batch_size or sampling_rate")
        return q

    def get_dataloaders(self):
        """nnU-Net's loaders, with the training loader replaced by Poisson sampling of cases."""
        mt_tr, mt_val = super().get_dataloaders()
        old = mt_tr.generator if hasattr(mt_tr, "generator") else mt_tr.data_loader
        if isinstance(mt_tr, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
            mt_tr._finish()
        self.dp_num_cases = len(old._data.identifiers)
        self.dp_sample_rate = self._sample_rate(self.dp_num_cases)
        initial_patch_size = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[2]
        dl = PoissonCaseLoader(old._data, self.batch_size, initial_patch_size, self.configuration_manager.patch_size,
                               self.label_manager, oversample_foreground_percent=self.oversample_foreground_percent,
                               transforms=old.transforms, sample_rate=self.dp_sample_rate)
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

    def _calibrate(self) -> None:
        o = self.options
        q, rounds, steps = self.dp_sample_rate, self.num_epochs, self.num_iterations_per_epoch
        self.dp_expected_batch = q * self.dp_num_cases
        accountant, decay = str(o["accountant"]).lower(), float(o["noise_decay"])
        extra = int(self.post_round_steps())  # e.g. local fine-tuning: private too, counted in the same budget
        if o["noise_multiplier"] is not None:
            self.dp_sigma0 = float(o["noise_multiplier"])
            if not self.dp_sigma0 > 0:
                raise acct.BudgetError(f"noise_multiplier must be > 0, got {self.dp_sigma0}")
            planned = acct.epsilon(acct.planned_schedule(self.dp_sigma0, q, steps, rounds, decay, extra),
                                   self.dp_delta, accountant, self.dp_mechanism)
            if o["target_epsilon"] is not None and planned > float(o["target_epsilon"]) * 1.0001:
                raise acct.BudgetError(
                    f"site {self.site_name}: noise_multiplier={self.dp_sigma0:g} over {rounds} rounds x {steps} steps"
                    f"{f' + {extra} fine-tuning steps' if extra else ''} (sampling rate {q:.4g}) would reach epsilon "
                    f"{planned:.4g} > target_epsilon={o['target_epsilon']:g}")
        else:
            self.dp_sigma0 = acct.calibrate(float(o["target_epsilon"]), self.dp_delta, q, steps, rounds, accountant,
                                            self.dp_mechanism, decay, float(o["max_noise_multiplier"]),
                                            extra_steps=extra)
            planned = acct.epsilon(acct.planned_schedule(self.dp_sigma0, q, steps, rounds, decay, extra),
                                   self.dp_delta, accountant, self.dp_mechanism)
        self.dp_planned_epsilon = planned
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
        self.print_to_log_file(
            f"DP ({self.dp_mechanism}, {accountant}): unit = training case, {self.dp_num_cases} cases, sampling rate "
            f"{q:.4g} (expected logical batch {self.dp_expected_batch:.2f}, physical batch {self.batch_size}), noise "
            f"multiplier {self.dp_sigma0:.4g} (decay {decay:g}/round), {rounds} rounds x {steps} steps"
            f"{f' + {extra} fine-tuning steps' if extra else ''}, clip {self.dp_clip:.4g}"
            f"{' adaptive' if self.dp_adaptive else ''}; planned epsilon {planned:.4g} at delta {self.dp_delta:g}")

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
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.dp_clip

        def physical_batches():
            for data, target in split_batch(batch, self.batch_size) if batch["keys"] else ():
                data = data.to(self.device, non_blocking=True)
                target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
                    else target.to(self.device, non_blocking=True)
                yield data, self._per_sample_losses(target)

        sigma = self._round_sigma()
        count_noise = self.dp_adaptive.count_noise_multiplier if self.dp_adaptive else None
        out = self.dp_sanitizer.step(physical_batches(), clip, self._split_noise(sigma, count_noise) * clip,
                                     self.dp_expected_batch)
        sampled, unclipped, loss_sum = out["sampled"], out["unclipped"], out["loss_sum"]
        self.optimizer.step()
        if self.dp_adaptive is not None:
            self.dp_clip = self.dp_adaptive.update(unclipped, sampled, self.dp_expected_batch)
            self.dp_last_fraction = self.dp_adaptive.last_unclipped_fraction
        self.dp_history = acct._merge(self.dp_history + [[sigma, self.dp_sample_rate, 1]])
        self.dp_steps += 1
        # nnU-Net logs the mean training loss locally (it never leaves the site: see round_metrics)
        return {"loss": np.array(loss_sum / sampled if sampled else np.nan)}

    def on_train_epoch_end(self, train_outputs):
        losses = [o["loss"] for o in train_outputs if np.isfinite(o["loss"])]
        super().on_train_epoch_end([{"loss": np.array(np.mean(losses) if losses else np.nan)}])

    # ------------------------------------------------------------------ accounting and reports
    def privacy_spent(self) -> float:
        return acct.epsilon(self.dp_history, self.dp_delta, str(self.options["accountant"]).lower(), self.dp_mechanism)

    def round_metrics(self) -> dict:
        metrics = super().round_metrics()
        # the training loss of the sampled cases is not privatised: it stays in the site's own log
        metrics.pop("train_loss", None)
        metrics.update({
            "epsilon": self.privacy_spent(), "delta": self.dp_delta,
            "noise_multiplier": self._round_sigma_of(self.current_epoch - 1),
            "sampling_rate": self.dp_sample_rate, "clip": self.dp_clip, "dp_steps": self.dp_steps,
        })
        if self.dp_adaptive is not None and self.dp_last_fraction is not None:
            metrics["unclipped_fraction_noisy"] = float(self.dp_last_fraction)
        return metrics

    def _round_sigma_of(self, r: int) -> float:
        return self.dp_sigma0 * float(self.options["noise_decay"]) ** max(r, 0)

    def privacy_report(self) -> dict:
        o = self.options
        return {
            "unit": "training case (Poisson-sampled, one patch per sampled case per step)",
            "site": self.site_name, "mechanism": self.dp_mechanism, "accountant": str(o["accountant"]).lower(),
            "epsilon": self.privacy_spent(), "delta": self.dp_delta, "planned_epsilon": self.dp_planned_epsilon,
            "target_epsilon": o["target_epsilon"], "num_training_cases": self.dp_num_cases,
            "sampling_rate": self.dp_sample_rate, "expected_batch_size": self.dp_expected_batch,
            "physical_batch_size": self.batch_size, "steps": self.dp_steps,
            "rounds": self.num_epochs, "local_steps": self.num_iterations_per_epoch,
            "steps_after_rounds": int(self.post_round_steps()),  # local fine-tuning, DP steps too
            "noise_multiplier": self.dp_sigma0, "noise_decay": float(o["noise_decay"]),
            "clip_norm": "L1" if self.dp_mechanism == "laplace" else "L2",
            "adaptive_clip": bool(self.dp_adaptive), "initial_clip": float(o["max_grad_norm"]), "final_clip": self.dp_clip,
            "count_noise_multiplier": self.dp_adaptive.count_noise_multiplier if self.dp_adaptive else None,
            "target_quantile": float(o["target_quantile"]) if self.dp_adaptive else None,
            # (effective noise multiplier, sampling rate, steps): replay with any accountant to check epsilon
            "history": self.dp_history,
        }

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            path = os.path.join(self.output_folder, "privacy_report.json")
            with open(path + ".tmp", "w") as f:
                json.dump(self.privacy_report(), f, indent=2)
            os.replace(path + ".tmp", path)
            rep = self.privacy_report()
            self.print_to_log_file(f"privacy: epsilon {rep['epsilon']:.4g} at delta {rep['delta']:g} after "
                                   f"{rep['steps']} steps ({path})")

    def extra_checkpoint_state(self) -> dict:
        state = super().extra_checkpoint_state()
        state[STATE_KEY] = {"history": [list(h) for h in self.dp_history], "clip": float(self.dp_clip),
                            "steps": int(self.dp_steps), "last_fraction": self.dp_last_fraction}
        return state

    def carry_over_released(self, attempt_checkpoint: dict) -> None:
        """The earlier attempt's steps were released with its update: keep them in the accountant history."""
        super().carry_over_released(attempt_checkpoint)
        state = attempt_checkpoint.get(STATE_KEY)
        if state is not None and int(state["steps"]) > self.dp_steps:
            self.dp_history = [[float(s), float(q), int(n)] for s, q, n in state["history"]]
            self.dp_steps = int(state["steps"])
            self.print_to_log_file(f"round retried: the earlier attempt's {self.dp_steps} accounted steps stay "
                                   f"counted (epsilon may exceed the target)")

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        super().load_extra_checkpoint_state(checkpoint)
        state = checkpoint.get(STATE_KEY)
        if state is None:
            return
        self.dp_history = [[float(s), float(q), int(n)] for s, q, n in state["history"]]
        self.dp_clip = float(state["clip"])
        self.dp_steps = int(state["steps"])
        self.dp_last_fraction = state.get("last_fraction")
        if getattr(self, "dp_adaptive", None) is not None:
            self.dp_adaptive.clip = self.dp_clip
