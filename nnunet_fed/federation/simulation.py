"""``nnunet_fed simulate``: every site on one machine, in one process, no network.

Sites train one after the other each round. All sites' networks keep their shared weights in one storage
(each turn starts by writing the global weights into it); what differs between sites stays with each
(optimizer state, local parameters, logger, learning-rate position, RNG state). Every site's batches come
from one pool of augmentation workers, forked before any network exists (``augmentation_pool``). After every
round each site writes a state file that an interrupted run resumes from. Updates are folded into the
running FedAvg sum as they arrive.

Outputs follow nnU-Net's layout::

    <nnUNet_results>/<site dataset>/<trainer>__<plans>__<config>/fold_<F>/checkpoint_final.pth   (per site)
    <nnUNet_results>/<federation>/<trainer>__<plans>__<config>/fold_<F>/checkpoint_final.pth     (global model)
                                                                 .../federation_metrics.jsonl, federation_progress.png
"""
from __future__ import annotations

import contextlib
import gc
import glob
import io
import multiprocessing
import os
import random
import re
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_fed import sites as site_checks
from nnunet_fed.federation.aggregation import NoValidUpdates
from nnunet_fed.federation.augmentation_pool import AugmentationPool, pool_available
from nnunet_fed.federation.records import MetricsLog, load_server_state, save_server_state
from nnunet_fed.federation.trainer import nnUNetTrainerFederated, capture_rng_state, restore_rng_state
from nnunet_fed.federation.update import shared_dataset_json, tensor_aliases
from nnunet_fed.privacy import randomness

ROUND_STATE_DIR = "federated_rounds"


@dataclass
class SimulationConfig:
    dataset_ids: Sequence[str]
    configuration: str
    trainer: str = "nnUNetTrainerFedAvg"
    rounds: int = 5
    local_steps: int = 50
    val_steps: int = 10
    fold: int | str = 0
    plans_identifier: str = "nnUNetPlans"
    device: str = "cuda"
    fedprox_mu: float = 0.0
    federation_name: str | None = None
    seed: int = 12345
    final_validation: bool = True
    fresh: bool = False
    progress: bool = True
    trainer_options: dict = field(default_factory=dict)  # -o name=value (see the trainer's federated_options)
    strategy: str = "fedavg"  # the server's rule (nnunet_fed.federation.aggregation.STRATEGIES)
    strategy_options: dict = field(default_factory=dict)  # --strategy-option name=value (the Flower rule's settings)
    diagnose: bool = False  # record update norms and cosines between site updates in federation_metrics.jsonl
    # a round without a valid update (every site's weights NaN/Inf, e.g. a model blown up by heavy server noise)
    # ends the federation with the last committed global model instead of raising NoValidUpdates (the audit: a
    # diverged model is what was released, and it is what gets audited)
    end_without_valid_update: bool = False
    site_names: list = field(default_factory=list)  # filled in by the checks

    def resume_key(self) -> dict:
        """What must not change between an interrupted run and its resumption."""
        return {"sites": list(self.site_names), "configuration": self.configuration, "trainer": self.trainer,
                "local_steps": self.local_steps, "rounds": self.rounds, "fold": str(self.fold),
                "plans": self.plans_identifier, "fedprox_mu": self.fedprox_mu,
                "trainer_options": {k: self.trainer_options[k] for k in sorted(self.trainer_options)},
                **({"strategy": self.strategy.lower(), "strategy_options": dict(sorted(self.strategy_options.items()))}
                   if self.strategy.lower() != "fedavg" or self.strategy_options else {})}


def default_federation_name(dataset_ids: Sequence[str | int]) -> str:
    ids = []
    for d in dataset_ids:
        m = re.match(r"Dataset(\d+)_", str(d))
        ids.append(str(int(m.group(1))) if m else str(d))
    return "DatasetFed_" + "_".join(f"{int(i):03d}" if i.isdigit() else i for i in ids)


def round_state_file(state_dir: str, round_index: int) -> str:
    """A site's state after round ``round_index`` (simulation and Flower sites alike)."""
    return os.path.join(state_dir, f"round_{round_index:04d}.pth")


def round_state_files(state_dir: str) -> list[tuple[int, str]]:
    """(round index, path) of every round state file in ``state_dir``, oldest first."""
    found = []
    for f in glob.glob(os.path.join(state_dir, "round_*.pth")):
        try:
            found.append((int(os.path.basename(f)[6:10]), f))
        except ValueError:
            continue
    return sorted(found)


def prune_round_states(state_dir: str, keep_from: int) -> None:
    """Remove the round state files before round ``keep_from``."""
    for k, f in round_state_files(state_dir):
        if k < keep_from:
            os.remove(f)


def _glibc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_LIBC = _glibc()
_M_MMAP_THRESHOLD = -3


@contextlib.contextmanager
def own_memory_maps_for_large_blocks(threshold: int = 4 << 20, afterwards: int = 32 << 20):
    """Inside: blocks of ``threshold`` bytes and more get their own memory map, which goes back to the system
    when the block is freed. Used while a resumed site loads its round state file: the checkpoint's temporary
    tensors are freed right after, and from the heap they would stay held while the other sites train (glibc
    raises its mmap threshold after the first such block is freed). Afterwards the threshold is ``afterwards``
    (glibc's maximum), so training steps reuse heap blocks for gradients as usual."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        if _LIBC is not None:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, int(afterwards))


def release_free_heap() -> None:
    """Give the memory freed by a site's turn back to the system (glibc keeps freed blocks in its arenas)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class SimulatedSite:
    """One site's trainer inside the simulation, with its state saved after every round.

    Sites train one at a time and every round starts from the global weights, so all sites' networks keep
    their shared tensors in one storage (``share_weights_with``): the simulation holds one copy of the shared
    weights, however many sites it has. What differs between sites stays with each: optimizer state (SGD
    momentum: one copy of the weights per site), local parameters, logger, learning-rate position and RNG
    state. The round state file written after every round is what an interrupted run resumes from; within
    one run it is not read back."""

    def __init__(self, trainer: nnUNetTrainerFederated):
        self.trainer = trainer
        self.state_dir = os.path.join(trainer.output_folder, ROUND_STATE_DIR)
        os.makedirs(self.state_dir, exist_ok=True)
        self.resume_from: str | None = None  # a round state file to load at the next turn (resumed run)
        self._rng_state: dict | None = None

    @property
    def name(self) -> str:
        return self.trainer.site_name

    def state_file(self, round_index: int) -> str:
        return round_state_file(self.state_dir, round_index)

    def share_weights_with(self, other: "SimulatedSite") -> None:
        """Let this site's shared tensors use ``other``'s storage (its own is freed). Their values are only
        meaningful during a site's turn, which starts by writing the global weights into them."""
        mine = self.trainer.plain_network.state_dict(keep_vars=True)
        theirs = other.trainer.plain_network.state_dict(keep_vars=True)
        with torch.no_grad():
            for name in self.trainer.shared_parameter_names():
                mine[name].data = theirs[name].data

    def run_round(self, round_index: int, global_arrays):
        t = self.trainer
        self.resume()
        update = t.run_round(global_arrays)
        t.save_round_state(self.state_file(round_index))
        self.suspend()
        return update

    def resume(self) -> None:
        """Make the site ready to train: its state from memory (or from ``resume_from``)."""
        t = self.trainer
        _move_optimizer_state(t.optimizer, t.device)
        if self.resume_from is not None:
            with own_memory_maps_for_large_blocks():
                t.load_checkpoint(self.resume_from)  # weights, optimizer, LR position, RNG, logger
            self.resume_from = None
        elif self._rng_state is not None and not t.private:  # (a private trainer's streams come from OS entropy)
            restore_rng_state(self._rng_state, t.device)
        self._rng_state = None

    def suspend(self) -> None:
        """Free what the site does not need until its next turn: data loader workers and gradients; on CUDA
        the optimizer state waits on the CPU."""
        t = self.trainer
        t.release_dataloaders()
        t.optimizer.zero_grad(set_to_none=True)  # gradients: one more copy of the weights per idle site
        self._rng_state = capture_rng_state(t.device)
        if t.device.type == "cuda":
            _move_optimizer_state(t.optimizer, torch.device("cpu"))
            torch.cuda.empty_cache()
        release_free_heap()

    def retire(self) -> None:
        """After the site's final model is written: free its optimizer state too."""
        self.trainer.optimizer.state.clear()
        self.suspend()

    def prune_states(self, keep_from: int) -> None:
        prune_round_states(self.state_dir, keep_from)


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.device != device:
                st[k] = v.to(device)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global random generators (a private trainer reseeds them from OS entropy
    where its data pipeline or loss draws from them: ``randomness.use_entropy_in_this_process``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    randomness.global_generators_seeded()


def site_seed(seed: int, site_name: str) -> int:
    """The seed of one site's random streams: the same for a site in a simulation and in a Flower deployment,
    different for every site."""
    return (int(seed) + zlib.crc32(site_name.encode())) % 2 ** 31


def _make_trainer(cfg: SimulationConfig, site_name: str, trainer_cls, device: torch.device) -> nnUNetTrainerFederated:
    """What nnUNetv2_train does to build a trainer (nnunetv2.run.run_training.get_trainer_from_args)."""
    base = os.path.join(os.environ["nnUNet_preprocessed"], site_name)
    plans = load_json(os.path.join(base, cfg.plans_identifier + ".json"))
    plans["continue_training"] = False
    # nnU-Net's constructor prints a banner per trainer; with a progress bar it goes to the site's log only
    with contextlib.redirect_stdout(io.StringIO()) if cfg.progress else contextlib.nullcontext():
        trainer = trainer_cls(plans=plans, configuration=cfg.configuration, fold=cfg.fold,
                              dataset_json=load_json(os.path.join(base, "dataset.json")), device=device)
    trainer.console_output = not cfg.progress
    trainer.defer_site_outputs(True)
    trainer.configure_federation(cfg.rounds, cfg.local_steps, cfg.val_steps, cfg.fedprox_mu, cfg.trainer_options)
    return trainer


def check_schedule(cfg: SimulationConfig) -> None:
    """The schedule and fold, named as the command's arguments; ``FederationSetupError`` before anything is written."""
    for arg, value in (("--rounds", cfg.rounds), ("--local-steps", cfg.local_steps), ("--val-steps", cfg.val_steps)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise site_checks.FederationSetupError(f"{arg} must be a whole number of at least 1, got {value!r}")
    if not (np.isfinite(cfg.fedprox_mu) and cfg.fedprox_mu >= 0):
        raise site_checks.FederationSetupError(f"--fedprox-mu must be a number >= 0 (0: plain FedAvg), got "
                                               f"{cfg.fedprox_mu!r}")
    if not (cfg.fold == "all" or (isinstance(cfg.fold, (int, np.integer)) and not isinstance(cfg.fold, bool)
                                  and cfg.fold >= 0)):
        raise site_checks.FederationSetupError(f"-f/--fold must be a fold number (0-4 with nnU-Net's 5-fold split) "
                                               f"or 'all', got {cfg.fold!r}")
    if cfg.federation_name is not None and not cfg.federation_name.startswith("Dataset"):
        raise site_checks.FederationSetupError(
            f"federation name {cfg.federation_name!r} must start with 'Dataset' (nnUNetv2_predict -d finds it so)")


def prepare(cfg: SimulationConfig):
    """All checks that can fail before anything is written: environment, schedule, IDs, datasets (labels of every
    preprocessed case), plans (the same network and preprocessing at every site), each site's split, trainer."""
    from nnunet_fed.site_data import verify_preprocessed_labels

    site_checks.require_nnunet_paths()
    check_schedule(cfg)
    trainer_cls = site_checks.find_trainer(cfg.trainer)
    options = trainer_cls.resolve_options(cfg.trainer_options)  # unknown or malformed options fail here
    try:  # the server's rule and its options
        trainer_cls.make_server_strategy(options, cfg.strategy, cfg.strategy_options, cfg.diagnose)
    except ValueError as e:
        raise site_checks.FederationSetupError(str(e)) from None
    names = [site_checks.dataset_name(d) for d in cfg.dataset_ids]
    site_checks.check_sites_compatible(names, source="preprocessed")
    for n in names:
        plans = site_checks.check_preprocessed(n, cfg.plans_identifier, cfg.configuration)
        trainer_cls.check_site_setup(n, plans, cfg.trainer_options)
        dataset_json = load_json(os.path.join(os.environ["nnUNet_preprocessed"], n, "dataset.json"))
        verify_preprocessed_labels(n, plans, cfg.configuration, dataset_json)
        trainer_cls.check_site_split(n, plans, cfg.configuration, cfg.fold)
    cfg.site_names = names
    check_same_network(cfg, trainer_cls)
    check_same_preprocessing(cfg)
    if cfg.federation_name is None:
        cfg.federation_name = default_federation_name(names)
    if not cfg.federation_name.startswith("Dataset"):
        raise site_checks.FederationSetupError(
            f"federation name {cfg.federation_name!r} must start with 'Dataset' (nnUNetv2_predict -d finds it so)")
    return trainer_cls


def _shared_shapes(site_name: str, plans_identifier: str, configuration: str, trainer_cls) -> dict:
    """Shapes of the shared parameters of the network the site's plans give (built, not trained; nothing written)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    base = os.path.join(os.environ["nnUNet_preprocessed"], site_name)
    pm = PlansManager(load_json(os.path.join(base, plans_identifier + ".json")))
    cm = pm.get_configuration(configuration)
    dataset_json = load_json(os.path.join(base, "dataset.json"))
    net = trainer_cls.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json),
                                                 pm.get_label_manager(dataset_json).num_segmentation_heads, True)
    state = net.state_dict()
    return {k: tuple(state[k].shape) for k in trainer_cls.sharing_policy.classify(net)[0]}


def check_same_network(cfg: SimulationConfig, trainer_cls) -> None:
    """FedAvg needs the same shared parameters at every site: compare the networks the sites' plans give."""
    names = cfg.site_names
    ref = _shared_shapes(names[0], cfg.plans_identifier, cfg.configuration, trainer_cls)
    for name in names[1:]:
        shapes = _shared_shapes(name, cfg.plans_identifier, cfg.configuration, trainer_cls)
        if shapes.keys() != ref.keys():
            diff = sorted(set(shapes) ^ set(ref))
            raise site_checks.FederationSetupError(
                f"site {name}: its network's shared parameters differ from site {names[0]} ({diff[:5]}); all sites "
                f"must train the same network: plan them together (nnunet_fed plan / --federated-planning)")
        for k, shape in shapes.items():
            if shape != ref[k]:
                raise site_checks.FederationSetupError(
                    f"site {name}: parameter {k} has shape {shape}, site {names[0]} has {ref[k]}; the sites' plans "
                    f"give different networks: plan them together (nnunet_fed plan / --federated-planning)")


def check_same_preprocessing(cfg: SimulationConfig) -> None:
    """Every site's plans must agree where training and prediction depend on them (``sites.plans_difference``):
    the global model's plans are the first site's, so prediction resamples and normalises every site's images
    like that site's."""
    names = cfg.site_names
    base = os.environ["nnUNet_preprocessed"]
    ref = load_json(os.path.join(base, names[0], cfg.plans_identifier + ".json"))
    for name in names[1:]:
        plans = load_json(os.path.join(base, name, cfg.plans_identifier + ".json"))
        diff = site_checks.plans_difference(plans, ref, cfg.configuration)
        if diff is not None:
            raise site_checks.FederationSetupError(site_checks.plans_difference_message(
                name, names[0], diff, cfg.plans_identifier, cfg.configuration))


def start_augmentation_pool(trainers: Sequence[nnUNetTrainerFederated], seed: int) -> AugmentationPool | None:
    """One pool of augmentation workers for all sites (see ``augmentation_pool``), forked now, before any
    network exists, with every site's nnU-Net data loaders. ``None`` where nnU-Net would augment in the main
    process (nnUNet_n_proc_DA=0) or the platform cannot fork: each site then keeps nnU-Net's own augmenters."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    n = get_allowed_n_proc_DA()
    if n == 0 or not pool_available():
        return None
    loaders = {t.site_name: t.build_data_loaders() for t in trainers}
    # as many workers as nnU-Net starts for one trainer (training plus validation), however many sites there are
    pool = AugmentationPool(loaders, num_processes=n + max(1, n // 2), num_cached=max(6, n // 2), seed=seed,
                            pin_memory=trainers[0].device.type == "cuda")
    for t in trainers:
        t.use_dataloaders(*pool.loaders_for(t.site_name))
    return pool


def start_sites(cfg: SimulationConfig, trainer_cls, device: torch.device, start_round: int = 0,
                stack: contextlib.ExitStack | None = None):
    """Build every site's trainer as nnUNetv2_train does and yield it as a suspended ``SimulatedSite``: network,
    optimizer and data loaders set up, shared weights in the first site's storage, its own random stream; a
    resumed run (``start_round`` > 0) loads the site's last round state file at its first turn.

    With an ``ExitStack``, the sites' batches come from one ``AugmentationPool`` that the stack closes;
    without, every site has nnU-Net's own augmenters."""
    trainers = [_make_trainer(cfg, name, trainer_cls, device) for name in cfg.site_names]
    for trainer in trainers:
        trainer.resuming = start_round > 0  # what a site released once (e.g. a noisy case count) is read back
    if stack is not None:
        pool = start_augmentation_pool(trainers, cfg.seed)
        if pool is not None:
            stack.callback(pool.close)
    first = None
    for trainer in trainers:
        name = trainer.site_name
        trainer.on_train_start()  # network, optimizer, data loaders, plans copied to the output folder
        site = SimulatedSite(trainer)
        if start_round > 0:
            site.resume_from = site.state_file(start_round - 1)
            if not os.path.isfile(site.resume_from):
                raise site_checks.FederationSetupError(
                    f"site {name}: cannot resume after round {start_round}: {site.resume_from} missing")
        if first is None:
            first = site
        else:
            site.share_weights_with(first)
        seed_everything(site_seed(cfg.seed, name))  # each site its own random stream (augmentation, noise)
        site.suspend()
        yield site


def global_model_folder(cfg: SimulationConfig) -> str:
    return os.path.join(os.environ["nnUNet_results"], cfg.federation_name,
                        f"{cfg.trainer}__{cfg.plans_identifier}__{cfg.configuration}")


def write_global_model(cfg: SimulationConfig, site0: nnUNetTrainerFederated, global_arrays, fold_dir: str,
                       completed_rounds: int) -> str:
    """The global model as an nnU-Net results folder, so nnUNetv2_predict -d <federation> works unchanged.

    Personalised trainers (a sharing policy with local parameters) have no global model: its local layers
    would be site 0's. Nothing is written then (returns None); each site's folder holds its personal model."""
    if site0.local_parameter_names():
        return None
    base = os.path.dirname(fold_dir)
    plans = dict(site0.plans_manager.plans)
    plans["dataset_name"] = cfg.federation_name
    save_json(plans, os.path.join(base, "plans.json"), sort_keys=False)
    dataset_json = shared_dataset_json(site0.dataset_json)  # no case counts or file lists of any site
    save_json(dataset_json, os.path.join(base, "dataset.json"), sort_keys=False)
    weights = {k: v.detach().cpu().clone() for k, v in site0.plain_network.state_dict().items()}
    for name, names in tensor_aliases(site0.plain_network).items():
        if name in global_arrays:  # every name of a shared tensor gets the global value
            value = torch.from_numpy(np.array(global_arrays[name]))
            for alias in names:
                weights[alias] = value
    checkpoint = {
        "network_weights": weights,
        "init_args": {**site0.my_init_kwargs, "plans": plans, "dataset_json": dataset_json},
        "trainer_name": site0.__class__.__name__,
        "inference_allowed_mirroring_axes": site0.inference_allowed_mirroring_axes,
        "current_epoch": int(completed_rounds),
    }
    path = os.path.join(fold_dir, "checkpoint_final.pth")
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def simulate(cfg: SimulationConfig) -> dict:
    """Run (or resume) a simulated federation. Returns a summary with the output folders and metrics."""
    trainer_cls = prepare(cfg)
    device = torch.device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    fold_dir = os.path.join(global_model_folder(cfg), f"fold_{cfg.fold}")
    if cfg.fresh and os.path.isdir(fold_dir):
        shutil.rmtree(fold_dir)
    os.makedirs(fold_dir, exist_ok=True)
    save_json({k: v for k, v in asdict(cfg).items()}, os.path.join(fold_dir, "federation_config.json"))

    state = load_server_state(fold_dir)
    if state is not None and state["run_config"] != cfg.resume_key():
        raise site_checks.FederationSetupError(
            f"{fold_dir} holds a run with other settings ({state['run_config']}); use --fresh to start over or "
            f"--federation-name to write elsewhere")
    start_round = state["completed_rounds"] if state else 0
    if start_round:
        print(f"resuming {cfg.federation_name} after round {start_round}/{cfg.rounds} ({fold_dir})")
    if not state:
        seed_everything(cfg.seed)

    with contextlib.ExitStack() as stack:  # closes the augmentation workers, however the run ends
        return _federate(cfg, trainer_cls, device, fold_dir, state, start_round, stack)


def _federate(cfg: SimulationConfig, trainer_cls, device: torch.device, fold_dir: str, state: dict | None,
              start_round: int, stack: contextlib.ExitStack) -> dict:
    sites = list(start_sites(cfg, trainer_cls, device, start_round, stack))
    global_arrays = state["global_arrays"] if state else sites[0].trainer.get_shared_arrays()  # its initial weights
    metrics = MetricsLog(fold_dir)
    metrics.truncate(start_round)
    strategy = trainer_cls.make_server_strategy(sites[0].trainer.options, cfg.strategy, cfg.strategy_options,
                                                cfg.diagnose)
    if state and hasattr(strategy, "load_state_dict"):
        strategy.load_state_dict(state.get("strategy_state", {}))
    if hasattr(strategy, "start"):  # stateful server rules (client-level DP): federation size, schedule, past rounds
        strategy.start(num_sites=len(sites), rounds=cfg.rounds, history=metrics.read(), min_updates=1)

    bar = None
    if cfg.progress and start_round < cfg.rounds:
        from tqdm import tqdm

        bar = tqdm(total=cfg.rounds * len(sites), initial=start_round * len(sites), unit="site-round",
                   desc="federated rounds", dynamic_ncols=True)
    completed, stopped = start_round, None
    try:
        for r in range(start_round, cfg.rounds):
            t0 = time.time()

            def updates():
                for i, site in enumerate(sites):
                    # this site's batches, then the next site's: prepared while this site trains
                    site.trainer.start_dataloaders()  # nothing to do when asked for during the previous turn
                    following = sites[i + 1] if i + 1 < len(sites) else (sites[0] if r + 1 < cfg.rounds else None)
                    if following is not None and following is not site:
                        following.trainer.start_dataloaders()
                    if bar is not None:
                        bar.set_postfix_str(f"round {r + 1}/{cfg.rounds} site {site.name}")
                    upd = site.run_round(r, global_arrays)
                    if bar is not None:
                        bar.update(1)
                    yield upd
                    del upd  # folded into the running sum: do not hold it while the next site trains

            try:
                global_arrays = strategy.aggregate(global_arrays, updates())
            except NoValidUpdates as e:
                if not cfg.end_without_valid_update:
                    raise
                stopped = f"round {r + 1}: {e}"
                print(f"federation ended after {r}/{cfg.rounds} rounds with the last committed global model: "
                      f"{stopped}")
                break
            completed = r + 1
            record = {"round": r, "sites": {u.site: {**u.metrics, "num_examples": u.num_examples}
                                            for u in strategy.accepted},
                      "rejected": [{"site": s, "reason": why} for s, why in strategy.rejected],
                      "seconds": time.time() - t0, **(strategy.round_record() if hasattr(strategy, "round_record") else {})}
            metrics.append(record)
            save_server_state(fold_dir, r + 1, global_arrays, cfg.resume_key(),
                              strategy.state_dict() if hasattr(strategy, "state_dict") else None)
            for site in sites:
                site.prune_states(keep_from=r)
            metrics.plot()
            if bar is not None:
                dice = [m["pseudo_dice"] for m in record["sites"].values() if "pseudo_dice" in m]
                eps = [m["epsilon"] for m in record["sites"].values() if "epsilon" in m]
                what = f"mean pseudo Dice {np.mean(dice):.3f}" if dice else \
                    f"epsilon {max(eps):.3g} (pseudo Dice kept at the sites)" if eps else "no metrics released"
                bar.write(f"round {r + 1}/{cfg.rounds}: {what} "
                          f"({record['seconds']:.1f} s){' rejected: ' + str(len(strategy.rejected)) if strategy.rejected else ''}")
    finally:
        if bar is not None:
            bar.close()
        for site in sites:
            site.trainer.release_dataloaders()

    # final models: every site gets the final global (shared) parameters
    for site in sites:
        t = site.trainer
        site.resume()  # the state after the last round (from the round state file if no round ran here)
        t.finish_federation(global_arrays)
        t.on_train_end()  # checkpoint_final.pth in nnU-Net's layout
        if cfg.final_validation:
            t.console_output = True
            t.perform_actual_validation(False)
        gc.collect()  # nnU-Net's progress plot (matplotlib figures are reference cycles)
        site.retire()  # the next site's final step does not need this one's optimizer state
    global_ckpt = write_global_model(cfg, sites[0].trainer, global_arrays, fold_dir, completed)
    metrics.plot()
    return {
        "completed_rounds": completed,
        "stopped": stopped,  # why the federation ended before cfg.rounds (end_without_valid_update), else None
        "global_model_folder": global_model_folder(cfg),
        "global_checkpoint": global_ckpt,
        "site_folders": {s.name: s.trainer.output_folder for s in sites},
        "metrics": metrics.read(),
        "federation_name": cfg.federation_name,
    }
