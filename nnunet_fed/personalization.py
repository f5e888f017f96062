"""Personalised federated training: local fine-tuning after the rounds, and the FedOAP trainer logic.

* :class:`LocalFineTuning` (mixin for :class:`~nnunet_fed.federation.trainer.nnUNetTrainerFederated`):
  after the last round, ``finetune_steps`` iterations of nnU-Net's own ``train_step`` on the site's data,
  every parameter trainable, fresh SGD momentum and a poly learning rate from ``finetune_lr`` to 0, with
  the perturbed boundary loss (:mod:`nnunet_fed.losses.pbl`) when ``pbl_lambda > 0``. The site's
  ``checkpoint_final.pth`` is then its personal model. Under plain ``nnUNetv2_train`` (one site, no server)
  the fine-tuning runs after the local rounds, so every method gets the same number of steps.
* :class:`DittoTrainer`: Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
  Personalization"): besides the global model (FedAvg, every parameter shared), each site trains a personal model
  with nnU-Net's loss plus ``ditto_lambda/2 ||v - w_global||^2``; the personal model never leaves the site and is
  the site's ``checkpoint_final.pth``.
* :class:`FedOAPNetwork` (mixin): the network (nnU-Net's UNet from the plans + decoupled cross-attention
  bottleneck + spatial adapters, :mod:`nnunet_fed.architectures`) and the sharing policy (query branch,
  Wq, adapters and heads stay at the site).

Trainer options (``-o name=value`` with ``nnunet_fed simulate``, ``nnUNet_fed_<name>`` under
``nnUNetv2_train``): ``finetune_steps``, ``finetune_lr``, ``pbl_lambda``, ``pbl_tau``, ``pbl_sigma``,
``pbl_band`` (0: error-mask variant; b > 0: band of b pixels around the ground-truth boundary).
Architecture settings (``dca_heads``, ``adapter_placement``) are class attributes, not options:
``nnUNetv2_predict`` rebuilds the network from the trainer class alone, so a variant is a subclass.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_fed.architectures.builder import ADAPTER_PLACEMENTS, FEDOAP_LOCAL_PATTERNS, build_fedoap_network
from nnunet_fed.federation.trainer import nnUNetTrainerFederated
from nnunet_fed.federation.update import SharingPolicy
from nnunet_fed.losses.pbl import wrap_with_pbl

FINETUNE_RECORD = "finetune.json"


def _finite_mean(values) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class LocalFineTuning:
    """Local fine-tuning phase after the federated rounds (optionally with the perturbed boundary loss)."""

    federated_options = {"finetune_steps": 50, "finetune_lr": 1e-3, "pbl_lambda": 0.1, "pbl_tau": 0.75,
                         "pbl_sigma": 0.1, "pbl_band": 0}

    @classmethod
    def resolve_options(cls, options=None, environ=None) -> dict:
        o = super().resolve_options(options, environ)
        problems = []
        if o["finetune_steps"] < 0:
            problems.append(f"finetune_steps must be >= 0, got {o['finetune_steps']}")
        if not o["finetune_lr"] > 0:
            problems.append(f"finetune_lr must be > 0, got {o['finetune_lr']}")
        if not 0.0 <= o["pbl_lambda"] <= 1.0:
            problems.append(f"pbl_lambda must lie in [0, 1], got {o['pbl_lambda']}")
        if not 0.0 <= o["pbl_tau"] < 1.0:
            problems.append(f"pbl_tau must lie in [0, 1), got {o['pbl_tau']}")
        if o["pbl_sigma"] < 0:
            problems.append(f"pbl_sigma must be >= 0, got {o['pbl_sigma']}")
        if o["pbl_band"] < 0:
            problems.append(f"pbl_band must be >= 0 pixels, got {o['pbl_band']}")
        if problems:
            raise ValueError(f"{cls.__name__}: " + "; ".join(problems))
        return o

    def post_round_steps(self) -> int:
        return int(self.options["finetune_steps"])

    def finish_federation(self, global_arrays) -> None:
        super().finish_federation(global_arrays)  # the final global shared parameters; local ones stay
        self.local_finetune()

    def run_training(self):
        """Single-site run (plain ``nnUNetv2_train``): the local rounds, then the fine-tuning phase."""
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            self.run_round(None)
        self.local_finetune()
        self.on_train_end()

    def finetune_loss(self):
        """nnU-Net's training loss, with PBL at every deep-supervision scale when ``pbl_lambda > 0``."""
        o = self.options
        if o["pbl_lambda"] == 0:
            return self.loss
        lm = self.label_manager
        return wrap_with_pbl(self.loss, lam=o["pbl_lambda"], tau=o["pbl_tau"], sigma=o["pbl_sigma"],
                             band=o["pbl_band"], regions=lm.has_regions, ignore_label=lm.ignore_label)

    def local_finetune(self) -> dict:
        """``finetune_steps`` x nnU-Net's ``train_step`` on the site's own data; returns (and records) the losses."""
        o = self.options
        steps = int(o["finetune_steps"])
        record = {"steps": steps, "lr": o["finetune_lr"], "pbl_lambda": o["pbl_lambda"], "pbl_tau": o["pbl_tau"],
                  "pbl_sigma": o["pbl_sigma"], "pbl_band": o["pbl_band"], "losses": []}
        if steps > 0:
            t0 = time.time()
            self.network.train()
            self.optimizer.state.clear()  # fresh momentum: the shared parameters were just replaced
            scheduler = PolyLRScheduler(self.optimizer, o["finetune_lr"], steps)
            training_loss, self.loss = self.loss, self.finetune_loss()
            try:
                for i in range(steps):
                    scheduler.step(i)
                    record["losses"].append(float(self.train_step(next(self.dataloader_train))["loss"]))
            finally:
                self.loss = training_loss
            record["seconds"] = time.time() - t0
            # a DP step on an empty Poisson batch has no loss (nan)
            first, last = (_finite_mean(record["losses"][:5]), _finite_mean(record["losses"][-5:]))
            self.print_to_log_file(f"local fine-tuning: {steps} steps, lr {o['finetune_lr']} (poly), "
                                   f"PBL lambda {o['pbl_lambda']}: loss {first:.4f} (first 5) -> {last:.4f} (last 5)")
        if self.local_rank == 0:
            from nnunet_fed.sites import write_json_atomic

            shared = record
            if self.private:  # the losses are not privatised: they stay in the site's training log
                self.print_to_log_file(f"fine-tuning losses (kept at the site): {record['losses']}",
                                       also_print_to_console=False)
                shared = {**record, "losses": "kept in the site's training log (not privatised)"}
            write_json_atomic(shared, os.path.join(self.output_folder, FINETUNE_RECORD))
        return record


class FedOAPNetwork:
    """FedOAP's network and sharing policy (mixin for nnUNetTrainerFederated)."""

    #: attention heads of the DCA bottleneck (reduced to a divisor of the bottleneck channels)
    dca_heads = 8
    #: spatial adapter before every deep-supervision head ("all") or only before the final head ("final")
    adapter_placement = "all"
    #: query branch, Wq, adapters and segmentation heads never leave the site
    sharing_policy = SharingPolicy(FEDOAP_LOCAL_PATTERNS)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        if cls.adapter_placement not in ADAPTER_PLACEMENTS:
            raise ValueError(f"{cls.__name__}.adapter_placement must be one of {ADAPTER_PLACEMENTS}")
        return build_fedoap_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                    enable_deep_supervision, num_heads=cls.dca_heads,
                                    adapters=cls.adapter_placement)


class FedOAPTrainer(FedOAPNetwork, LocalFineTuning, nnUNetTrainerFederated):
    """FedOAP: federated rounds averaging the shared parameters, then local fine-tuning with PBL at every site."""


class DittoTrainer(nnUNetTrainerFederated):
    """Ditto (Li et al. 2021): a global model averaged by FedAvg and, at each site, a personal model of the same
    architecture pulled towards the global one.

    A round: ``local_steps`` of nnU-Net's ``train_step`` on the global model (what the site sends), then
    ``ditto_steps`` (0: as many as ``local_steps``) on the personal model, whose SGD step adds the gradient of
    ``ditto_lambda/2 ||v - w||^2``, ``w`` the global weights received at the start of the round. Both models use
    nnU-Net's optimizer (SGD, momentum 0.99, poly learning rate over the rounds); pseudo-Dice validation runs on the
    personal model. The personal weights and optimizer are kept with the round state (resume, Flower rounds). Why
    not Flower's: Flower has strategies, not client training; Ditto is a client-side rule.
    """

    federated_options = {"ditto_lambda": 0.1, "ditto_steps": 0}

    @classmethod
    def resolve_options(cls, options=None, environ=None) -> dict:
        o = super().resolve_options(options, environ)
        if o["ditto_lambda"] < 0 or o["ditto_steps"] < 0:
            raise ValueError(f"{cls.__name__}: ditto_lambda and ditto_steps must be >= 0, got "
                             f"{o['ditto_lambda']} and {o['ditto_steps']}")
        return o

    def initialize(self):
        super().initialize()
        self.personal_network = copy.deepcopy(self.plain_network)  # own storage: never the shared weights
        global_network, self.network = self.network, self.personal_network
        try:
            self.personal_optimizer, self.personal_lr_scheduler = self.configure_optimizers()
        finally:
            self.network = global_network
        self.personal_optimizer.register_step_pre_hook(self._add_ditto_gradient)
        self.ditto_reference: dict | None = None

    def on_round_start(self, global_arrays) -> None:
        super().on_round_start(global_arrays)
        if global_arrays is not None:
            self.ditto_reference = {k: torch.as_tensor(v).to(self.device) for k, v in global_arrays.items()}

    def _add_ditto_gradient(self, optimizer, args, kwargs):
        if self.ditto_reference is None or self.options["ditto_lambda"] <= 0:
            return
        with torch.no_grad():
            for name, p in self.personal_network.named_parameters():
                ref = self.ditto_reference.get(name)
                if ref is not None and p.grad is not None:
                    p.grad.add_(p.detach() - ref, alpha=self.options["ditto_lambda"])

    @contextlib.contextmanager
    def personal_model(self):
        """nnU-Net's ``train_step`` / ``validation_step`` act on the personal model inside this block."""
        saved = self.network, self.optimizer, self.lr_scheduler
        self.network, self.optimizer, self.lr_scheduler = (self.personal_network, self.personal_optimizer,
                                                           self.personal_lr_scheduler)
        try:
            yield
        finally:
            self.network, self.optimizer, self.lr_scheduler = saved

    def local_training(self) -> list:
        outputs = super().local_training()  # the global model's steps: what the site sends
        steps = int(self.options["ditto_steps"]) or self.num_iterations_per_epoch
        with self.personal_model():
            self.personal_lr_scheduler.step(self.current_epoch)  # the same poly position as the global model's
            self.network.train()
            for _ in range(steps):
                self.train_step(next(self.dataloader_train))
        return outputs

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.personal_network.eval()

    def validation_step(self, batch: dict) -> dict:
        with self.personal_model():
            return super().validation_step(batch)

    def post_round_steps(self) -> int:
        return 0

    def finish_federation(self, global_arrays) -> None:
        """The site's final model is its personal model (the server writes the global one)."""
        super().finish_federation(global_arrays)
        self.plain_network.load_state_dict(self.personal_network.state_dict())

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), "ditto_personal_weights": self.personal_network.state_dict(),
                "ditto_personal_optimizer": self.personal_optimizer.state_dict()}

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        super().load_extra_checkpoint_state(checkpoint)
        if "ditto_personal_weights" in checkpoint:
            self.personal_network.load_state_dict(checkpoint["ditto_personal_weights"])
            self.personal_optimizer.load_state_dict(checkpoint["ditto_personal_optimizer"])


class FineTunedFedAvgTrainer(LocalFineTuning, nnUNetTrainerFederated):
    """FedAvg (nnU-Net's plain UNet, everything shared), then the same local fine-tuning (plain loss)."""

    federated_options = {"pbl_lambda": 0.0}
