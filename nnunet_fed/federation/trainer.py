"""The federated trainer base: nnU-Net's epoch loop turned into rounds.

One round is one nnU-Net epoch: ``num_epochs`` is the number of rounds and
``num_iterations_per_epoch`` the number of local steps per round, so nnU-Net's poly learning rate
runs over the whole federated schedule and every checkpoint, log and plot keeps its meaning.
Training itself is nnU-Net's own ``train_step`` (loss, deep supervision, augmentation, AMP on CUDA).

Hooks, in the order a round calls them (override any of them in a subclass)::

    on_round_start(global_arrays)  load the shared parameters received from the server
    train_round()                  local_steps x train_step, then nnU-Net's validation pass
    on_round_end() -> Update       the shared parameters, number of training cases, metrics

Under plain ``nnUNetv2_train`` the same rounds run with no server (a single-site, local run).
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Mapping

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule

from nnunet_fed.federation.augmentation_pool import PooledLoader, augmentation_in_this_process
from nnunet_fed.federation.update import SharingPolicy, Update

# Under plain nnUNetv2_train the schedule and every trainer option come from nnUNet_fed_<name> variables
# (environment_setting); the nnunet_fed commands set the same attributes through configure_federation().
ENV_PREFIX = "nnUNet_fed_"
#: in a round state file: what the site sent for that round (a repeated round re-sends it; see the ClientApp)
RELEASED_UPDATE_KEY = "released_update"
SCHEDULE_SETTINGS = ("rounds", "local_steps", "val_steps", "fedprox_mu")
#: nnU-Net's automatic split is a 5-fold cross-validation: a site with fewer cases trains on all of them
MIN_CASES_FOR_CROSS_VALIDATION = 5


def environment_setting(name: str, default, environ: Mapping | None = None, owner: str = "nnunet_fed"):
    """The value of the variable ``nnUNet_fed_<name>``, cast to the type of ``default``; ``default`` when
    it is unset or empty. A value that does not cast is an error naming the variable."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_PREFIX + name, "")
    if value == "":
        return default
    try:
        return _cast_option(owner, name, value, default)
    except ValueError:
        kind = type(default).__name__ if default is not None else "number"
        raise ValueError(f"{owner}: environment variable {ENV_PREFIX}{name}={value!r} is not a valid {kind}") from None


def _cast_option(trainer: str, name: str, value, default):
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip().lower()
        try:
            if isinstance(default, bool):
                if text not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                return text in ("1", "true", "yes")
            if isinstance(default, int):
                return int(text)
            if isinstance(default, float) or default is None:
                return float(text) if text not in ("", "none") else None
        except ValueError:
            raise ValueError(f"{trainer}: option {name}={value!r} is not a valid "
                             f"{type(default).__name__ if default is not None else 'number'}") from None
    return value


def capture_rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], device)


def _no_plot(output_folder) -> None:
    """Stands in for the logger's plot_progress_png while site outputs are deferred."""


class nnUNetTrainerFederated(nnUNetTrainer):
    """Base class of every nnunet_fed trainer. On its own it behaves like FedAvg with all parameters shared."""

    #: which parameters stay at the site; the default shares everything
    sharing_policy = SharingPolicy()
    #: a private trainer (DP) releases accounted values only: its metrics pass ``release_metrics``, its
    #: checkpoints hold no random-generator state (its randomness comes from OS entropy)
    private = False
    #: aggregation rule the server uses for this trainer (see nnunet_fed.federation.aggregation)
    server_strategy = "fedavg"
    #: trainer options and their defaults (merged along the class hierarchy). Under plain nnUNetv2_train an
    #: option is read from the environment variable ``nnUNet_fed_<name>``; ``nnunet_fed simulate`` sets them
    #: with ``-o name=value``.
    #: ``local_momentum``: what happens to nnU-Net's SGD momentum of the shared parameters when a round starts
    #: with new global weights: ``keep`` (default: the buffer carries on, as in nnU-Net's own loop) or ``reset``
    #: (dropped; torch's SGD restarts it from the next gradient). Measured in the README's "Federation against
    #: training alone": reset lost 4 to 10 Dice points at both round lengths (at momentum 0.99 a fresh buffer
    #: needs ~100 steps to reach its full step size, so every round trains with a smaller effective rate).
    federated_options: dict = {"local_momentum": "keep"}
    #: allowed values of string options
    option_choices: dict = {"local_momentum": ("reset", "keep")}

    @classmethod
    def option_defaults(cls) -> dict:
        merged = {}
        for klass in reversed(cls.__mro__):  # each class's own dict only, so mixins combine
            merged.update(klass.__dict__.get("federated_options", {}) or {})
        return merged

    @classmethod
    def resolve_options(cls, options: Mapping | None = None, environ: Mapping | None = None) -> dict:
        """Defaults, overridden by ``nnUNet_fed_<name>`` variables, overridden by ``options``."""
        defaults = cls.option_defaults()
        environ = os.environ if environ is None else environ
        unknown = sorted(set(options or {}) - set(defaults))
        if unknown:
            raise ValueError(f"{cls.__name__} has no option {', '.join(unknown)}; its options are "
                             f"{sorted(defaults) or 'none'}")
        clash = sorted(set(defaults) & set(SCHEDULE_SETTINGS))
        if clash:
            raise TypeError(f"{cls.__name__}: trainer options may not be named like a schedule setting ({clash})")
        resolved = {}
        for name, default in defaults.items():
            if options and name in options:
                resolved[name] = _cast_option(cls.__name__, name, options[name], default)
            else:
                resolved[name] = environment_setting(name, default, environ, cls.__name__)
        choices = {}
        for klass in reversed(cls.__mro__):
            choices.update(klass.__dict__.get("option_choices", {}) or {})
        for name, allowed in choices.items():
            if name in resolved and resolved[name] not in allowed:
                raise ValueError(f"{cls.__name__}: option {name}={resolved[name]!r} is not one of {list(allowed)}")
        return resolved

    @classmethod
    def check_site_setup(cls, site_name: str, plans: dict, options: Mapping | None = None) -> None:
        """Checks a site's set-up before anything is written (``simulate``'s checks, the Flower ClientApp):
        raise an error naming the site and the problem. The base trainer accepts every plan."""

    @classmethod
    def check_site_split(cls, site_name: str, plans: dict, configuration: str, fold) -> None:
        """Before anything is written: the site's split for ``fold`` can be made (raise an error naming the site
        otherwise). nnU-Net's split always can: a site with fewer than ``MIN_CASES_FOR_CROSS_VALIDATION`` cases
        trains on all of them (``do_split``)."""

    @classmethod
    def averaging_strategy(cls, options: Mapping | None = None, diagnose: bool = False):
        """The server's validated, example-weighted average for this trainer (client-level DP wraps it);
        ``diagnose``: record update norms and cosines (see :class:`~nnunet_fed.federation.aggregation.FedAvg`)."""
        from nnunet_fed.federation.aggregation import FedAvg

        return FedAvg(diagnose=diagnose)

    @classmethod
    def make_server_strategy(cls, options: Mapping | None = None, strategy: str | None = None,
                             strategy_options: Mapping | None = None, diagnose: bool = False):
        """The server-side aggregation for this trainer (simulation and Flower ServerApp alike): the rule
        ``strategy`` (default: the trainer's ``server_strategy``) over :meth:`averaging_strategy`."""
        from nnunet_fed.federation.aggregation import make_strategy

        return make_strategy(strategy or cls.server_strategy, strategy_options,
                             cls.averaging_strategy(options, diagnose))

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = environment_setting("rounds", self.num_epochs)
        self.num_iterations_per_epoch = environment_setting("local_steps", self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = environment_setting("val_steps", self.num_val_iterations_per_epoch)
        self.fedprox_mu = environment_setting("fedprox_mu", 0.0)
        self.options = self.resolve_options()
        # In a simulation, a site's progress.png and checkpoint_best.pth are written from its round state
        # (no extra serialisation per site and round); see defer_site_outputs().
        self._deferred_outputs = False
        self._best_pending = False
        self.federated_round_reference: dict[str, torch.Tensor] | None = None  # global weights of this round
        self.num_training_cases: int | None = None
        self.console_output = True
        #: set by a driver (simulate, the Flower ClientApp) that continues a run whose state files exist: what the
        #: site released once per run (e.g. a DP site's noisy case count) is then read back, not drawn again
        self.resuming = False
        #: the update sent for the round that just ended, kept with its round state (set by the Flower ClientApp)
        self.released_update: dict | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def site_name(self) -> str:
        return self.plans_manager.dataset_name

    @property
    def num_rounds(self) -> int:
        return self.num_epochs

    @property
    def local_steps(self) -> int:
        return self.num_iterations_per_epoch

    def configure_federation(self, rounds: int, local_steps: int, val_steps: int | None = None,
                             fedprox_mu: float | None = None, options: Mapping | None = None) -> None:
        """Set the schedule before ``initialize()``: ``rounds`` rounds of ``local_steps`` iterations.

        ``options`` overrides trainer options (see ``federated_options``)."""
        if options:
            self.options = self.resolve_options(options)
        if rounds < 1 or local_steps < 1:
            raise ValueError(f"rounds and local_steps must be >= 1, got rounds={rounds}, local_steps={local_steps}")
        self.num_epochs = int(rounds)
        self.num_iterations_per_epoch = int(local_steps)
        if val_steps is not None:
            if val_steps < 1:
                raise ValueError(f"val_steps must be >= 1, got {val_steps}")
            self.num_val_iterations_per_epoch = int(val_steps)
        if fedprox_mu is not None:
            if fedprox_mu < 0:
                raise ValueError(f"fedprox_mu must be >= 0, got {fedprox_mu}")
            self.fedprox_mu = float(fedprox_mu)

    def defer_site_outputs(self, defer: bool = True) -> None:
        """Draw progress.png only at the end and write checkpoint_best.pth by linking the round state file
        (saves ~1 s per site and round against nnU-Net's per-epoch plot and checkpoint)."""
        self._deferred_outputs = defer
        if defer:
            self.logger.plot_progress_png = _no_plot  # instance attribute: nnU-Net's on_epoch_end calls it
        else:
            self.logger.__dict__.pop("plot_progress_png", None)

    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        super().print_to_log_file(*args, also_print_to_console=also_print_to_console and getattr(self, "console_output", True),
                                  add_timestamp=add_timestamp)

    # ------------------------------------------------------------------ setup
    def initialize(self):
        super().initialize()
        # FedProx: the proximal gradient mu * (w - w_global) is added right before each optimizer step.
        # It does not depend on data, so it composes with gradient clipping and noise.
        self.optimizer.register_step_pre_hook(self._add_proximal_gradient)

    def on_train_start(self):
        preset = self.__dict__.pop("_preset_dataloaders", None)
        if preset is not None:  # nnU-Net's on_train_start would build (and start) its own augmenters
            self.get_dataloaders = lambda: preset
        try:
            super().on_train_start()
        finally:
            self.__dict__.pop("get_dataloaders", None)
        tr_keys, _ = self.do_split()
        self.num_training_cases = len(tr_keys)

    def do_split(self):
        """nnU-Net's split, except at a site with fewer cases than nnU-Net's 5-fold split needs (and no
        ``splits_final.json`` of its own): nnU-Net would stop ("Cannot have number of splits n_splits=5 greater
        than the number of samples"); here such a site trains on all its cases and validates on them, as nnU-Net
        does for fold 'all'."""
        if self.fold != "all" and not os.path.isfile(os.path.join(self.preprocessed_dataset_folder_base,
                                                                  "splits_final.json")):
            if self.dataset_class is None:
                from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

                self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
            cases = sorted(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
            if len(cases) < MIN_CASES_FOR_CROSS_VALIDATION:
                self.print_to_log_file(
                    f"site {self.site_name}: {len(cases)} training cases, fewer than the "
                    f"{MIN_CASES_FOR_CROSS_VALIDATION} nnU-Net's 5-fold split needs: it trains on all of them and "
                    f"validates on them, as fold 'all' does")
                return cases, cases
        return super().do_split()

    def build_data_loaders(self) -> tuple:
        """This trainer's nnU-Net data loaders (train, val), transforms included, with no worker processes:
        what ``get_dataloaders`` would hand to its augmenters (any subclass's loaders, e.g. Poisson sampling)."""
        if not self.was_initialized:
            self._set_batch_size_and_oversample()  # what initialize() does first; the network is not needed
        with augmentation_in_this_process():
            train, val = self.get_dataloaders()
        return train.data_loader, val.data_loader

    def use_dataloaders(self, train, val) -> None:
        """Iterate ``train`` and ``val`` instead of the augmenters ``on_train_start`` would build (call before it)."""
        self._preset_dataloaders = (train, val)

    @property
    def plain_network(self) -> torch.nn.Module:
        net = self.network.module if self.is_ddp else self.network
        return net._orig_mod if isinstance(net, OptimizedModule) else net

    # ------------------------------------------------------------------ parameters
    def shared_parameter_names(self) -> list[str]:
        """Names of the tensors the site sends (one name per tensor, see ``SharingPolicy.classify``)."""
        return self.sharing_policy.classify(self.plain_network)[0]

    def local_parameter_names(self) -> list[str]:
        """Names of the tensors that never leave the site."""
        return self.sharing_policy.classify(self.plain_network)[1]

    def get_shared_arrays(self) -> dict[str, np.ndarray]:
        """The shared parameters as numpy arrays (copies: they may leave the site)."""
        state = self.plain_network.state_dict()
        return {k: state[k].detach().cpu().numpy().copy() for k in self.shared_parameter_names()}

    def set_shared_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        expected = set(self.shared_parameter_names())
        if set(arrays) != expected:
            missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
            raise ValueError(f"site {self.site_name!r}: global arrays do not match the shared parameters "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
        state = self.plain_network.state_dict()
        with torch.no_grad():
            for k, v in arrays.items():
                if tuple(state[k].shape) != tuple(v.shape):
                    raise ValueError(f"site {self.site_name!r}: global array {k!r} has shape {tuple(v.shape)}, "
                                     f"the site's network has {tuple(state[k].shape)}")
                state[k].copy_(torch.as_tensor(v))

    def _add_proximal_gradient(self, optimizer, args, kwargs):
        if self.fedprox_mu <= 0 or self.federated_round_reference is None:
            return
        with torch.no_grad():
            for name, p in self.plain_network.named_parameters():
                ref = self.federated_round_reference.get(name)
                if ref is not None and p.grad is not None:
                    p.grad.add_(p.detach() - ref, alpha=self.fedprox_mu)

    # ------------------------------------------------------------------ the round
    def on_round_start(self, global_arrays: Mapping[str, np.ndarray] | None) -> None:
        """Load the global (shared) parameters; ``None`` keeps the site's own weights (single-site run)."""
        if global_arrays is not None:
            self.set_shared_arrays(global_arrays)
            if self.options.get("local_momentum") == "reset":
                self.reset_shared_momentum()
            if self.fedprox_mu > 0:
                self.federated_round_reference = {
                    k: torch.as_tensor(v).to(self.device) for k, v in global_arrays.items()}

    def reset_shared_momentum(self) -> None:
        """Drop the optimizer's momentum buffers of the shared parameters (torch's SGD starts a missing buffer
        from the next gradient); local parameters keep theirs."""
        shared = set(self.shared_parameter_names())
        for name, p in self.plain_network.named_parameters():
            if name in shared:
                self.optimizer.state.get(p, {}).pop("momentum_buffer", None)

    def train_round(self) -> None:
        """nnU-Net's epoch body: local_steps x train_step, then the pseudo-Dice validation pass."""
        self.on_epoch_start()
        self.on_train_epoch_start()
        train_outputs = self.local_training()
        self.on_train_epoch_end(train_outputs)
        with torch.no_grad():
            self.on_validation_epoch_start()
            val_outputs = [self.validation_step(next(self.dataloader_val))
                           for _ in range(self.num_val_iterations_per_epoch)]
            self.on_validation_epoch_end(val_outputs)
        self.on_epoch_end()

    def local_training(self) -> list:
        """The round's training steps (``local_steps`` x nnU-Net's ``train_step``); returns their outputs."""
        return [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]

    def round_metrics(self) -> dict:
        """Metrics of the round that just ended, read from nnU-Net's logger."""
        get = self.logger.get_value
        return {
            "round": self.current_epoch - 1,
            "train_loss": float(get("train_losses", step=-1)),
            "val_loss": float(get("val_losses", step=-1)),
            "pseudo_dice": float(get("mean_fg_dice", step=-1)),
            "pseudo_dice_per_class": [float(x) for x in get("dice_per_class_or_region", step=-1)],
            "lr": float(get("lrs", step=-1)),
            "seconds": float(get("epoch_end_timestamps", step=-1) - get("epoch_start_timestamps", step=-1)),
            "local_steps": int(self.num_iterations_per_epoch),
        }

    def release_metrics(self, metrics: dict) -> dict:
        """The part of a site's metrics that may leave it (a private trainer keeps the rest in its own log)."""
        return metrics

    def fedavg_weight(self) -> int:
        """The weight of this site's update in the server's average (``Update.num_examples``)."""
        return int(self.num_training_cases)

    def on_round_end(self) -> Update:
        self.federated_round_reference = None
        return Update(site=self.site_name, arrays=self.get_shared_arrays(), num_examples=self.fedavg_weight(),
                      metrics=self.release_metrics(self.round_metrics()))

    def run_round(self, global_arrays: Mapping[str, np.ndarray] | None = None) -> Update:
        self.on_round_start(global_arrays)
        self.train_round()
        return self.on_round_end()

    def post_round_steps(self) -> int:
        """Training steps the site takes after the last round (local fine-tuning); privacy accounting counts them."""
        return 0

    def finish_federation(self, global_arrays: Mapping[str, np.ndarray]) -> None:
        """After the last round: take the final global parameters (personalizing trainers fine-tune here)."""
        self.set_shared_arrays(global_arrays)

    def run_training(self):
        """Single-site run (plain ``nnUNetv2_train``): the same rounds with no server."""
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            self.run_round(None)
        self.on_train_end()

    # ------------------------------------------------------------------ state between rounds
    def start_dataloaders(self) -> None:
        """Have the next round's batches prepared ahead of the site's turn: pooled loaders are asked for exactly
        the round's steps; nnU-Net's augmenters start their workers (they fill their queues meanwhile)."""
        steps = (self.num_iterations_per_epoch, self.num_val_iterations_per_epoch)
        for dl, n in zip((self.dataloader_train, self.dataloader_val), steps):
            if isinstance(dl, PooledLoader):
                dl.prefetch(n)
            elif isinstance(dl, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                dl._start()

    def release_dataloaders(self) -> None:
        """Between turns: pooled loaders drop requests not yet started; nnU-Net's augmenters stop their workers
        (they restart on the next batch request)."""
        for dl in (self.dataloader_train, self.dataloader_val):
            if isinstance(dl, PooledLoader):
                dl.cancel()
            elif isinstance(dl, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                dl._finish()

    def keeps_checkpoint(self, filename: str) -> bool:
        """Whether nnU-Net's checkpoint ``filename`` is written at all (a private trainer skips checkpoint_best)."""
        return True

    def checkpoint_contents(self, filename: str, checkpoint: dict) -> dict:
        """What goes into ``filename`` (a private trainer strips the final model of values it does not release)."""
        return checkpoint

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the RNG state (not for private trainers), so that a resumed run continues the
        same random streams."""
        if self.local_rank != 0 or not self.keeps_checkpoint(filename):
            return
        if self._deferred_outputs and os.path.basename(filename) == "checkpoint_best.pth":
            self._best_pending = True  # materialised from the round state file by save_round_state
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.plain_network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            **({} if self.private else {"rng_state": capture_rng_state(self.device)}),
            **({RELEASED_UPDATE_KEY: self.released_update} if self.released_update else {}),
            **self.extra_checkpoint_state(),
        }
        checkpoint = self.checkpoint_contents(filename, checkpoint)
        tmp = filename + ".tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)  # never leave a half-written checkpoint behind

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's checkpoint loading (which accepts only file names) for a file or a dict, plus the RNG state."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            # a file this site wrote itself (never one received over the network)
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        weights = {(k[7:] if k.startswith("module.") else k): v for k, v in checkpoint["network_weights"].items()}
        self.plain_network.load_state_dict(weights)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        if "logging" in checkpoint:  # (a private trainer's final model has no training log)
            self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint.get("_best_ema")
        self.inference_allowed_mirroring_axes = checkpoint.get(
            "inference_allowed_mirroring_axes", self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        if "rng_state" in checkpoint:
            restore_rng_state(checkpoint["rng_state"], self.device)
        self.load_extra_checkpoint_state(checkpoint)

    def extra_checkpoint_state(self) -> dict:
        """Subclasses add what must survive between rounds and across a resume (e.g. a privacy accountant).
        Keys are merged into the checkpoint dict; use a unique prefix. Plain Python/tensor values only."""
        return {}

    def carry_over_released(self, attempt_checkpoint: dict) -> None:
        """A round is being trained again after an earlier attempt whose update already left the site (a
        deployment retries a round that too few sites answered). The site restarts from the state before the
        round, but what the earlier attempt released must stay counted: privacy trainers keep its spending here."""

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        """Counterpart of ``extra_checkpoint_state``: restore from a checkpoint dict (keys may be absent)."""

    def save_round_state(self, filename: str) -> None:
        """Everything the site needs to continue after round ``current_epoch - 1`` (called after the round)."""
        self.current_epoch -= 1  # on_epoch_end already advanced the counter (as in nnU-Net's on_train_end)
        try:
            self.save_checkpoint(filename)
        finally:
            self.current_epoch += 1
        if self._best_pending and not self.disable_checkpointing and self.local_rank == 0:
            best = os.path.join(self.output_folder, "checkpoint_best.pth")
            tmp = best + ".tmp"
            if os.path.lexists(tmp):
                os.remove(tmp)
            try:
                os.link(filename, tmp)  # same bytes nnU-Net would have written at the end of this epoch
            except OSError:
                shutil.copyfile(filename, tmp)
            os.replace(tmp, best)
            self._best_pending = False

    def on_train_end(self):
        super().on_train_end()
        if self._deferred_outputs and self.local_rank == 0:
            type(self.logger).plot_progress_png(self.logger, self.output_folder)  # the plot skipped after each round

