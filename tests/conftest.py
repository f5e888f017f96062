"""Shared fixtures: tiny synthetic sites, planned and preprocessed once per test session with nnU-Net."""
import os
import subprocess
import sys

import pytest

FIRST_ID = 201
NUM_SITES = 3


def nnunet_env(root, results_name="results") -> dict:
    return {
        "nnUNet_raw": os.path.join(root, "raw"),
        "nnUNet_preprocessed": os.path.join(root, "preprocessed"),
        "nnUNet_results": os.path.join(root, results_name),
        "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "2"),
    }


@pytest.fixture(scope="session")
def planned_sites(tmp_path_factory):
    """Three 2D 'shift' sites (32x32, 12 training cases each), planned and preprocessed by nnU-Net with one set of
    plans: nnU-Net plans the sites, and the first site's plans are moved to the others (nnU-Net's
    nnUNetv2_move_plans_between_datasets) before every site is preprocessed. Sites planned apart get different
    target spacings, which a federation refuses."""
    root = str(tmp_path_factory.mktemp("sites"))
    env = nnunet_env(root)
    for k, v in env.items():
        os.environ[k] = v
        os.makedirs(v, exist_ok=True) if k != "nnUNet_n_proc_DA" else None
    from nnunet_fed.data.synthetic import make_federated_datasets

    names = make_federated_datasets(first_id=FIRST_ID, num_sites=NUM_SITES, scenario="shift", dim=2, num_train=12,
                                    num_test=3, seed=0, image_size=(32, 32))
    ids = [str(FIRST_ID + k) for k in range(NUM_SITES)]
    from nnunet_fed.planning import plan_and_preprocess_sites

    plan_and_preprocess_sites(ids, configurations=("2d",), num_processes=2)
    return {"root": root, "env": env, "names": names, "ids": [str(FIRST_ID + k) for k in range(NUM_SITES)]}


@pytest.fixture
def site_env(planned_sites, tmp_path, monkeypatch):
    """The planned sites with a fresh, empty nnUNet_results for this test."""
    env = dict(planned_sites["env"])
    env["nnUNet_results"] = str(tmp_path / "results")
    os.makedirs(env["nnUNet_results"])
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {**planned_sites, "env": env, "results": env["nnUNet_results"]}


def site_trainer(site_env, trainer: str, **config):
    """An nnU-Net trainer of the first site as ``simulate`` builds it (checked, not initialised); ``config``:
    further SimulationConfig fields."""
    import torch

    from nnunet_fed.federation.simulation import SimulationConfig, _make_trainer, prepare

    cfg = SimulationConfig(dataset_ids=site_env["ids"][:1], configuration="2d", trainer=trainer, device="cpu",
                           progress=False, **config)
    cls = prepare(cfg)
    return _make_trainer(cfg, cfg.site_names[0], cls, torch.device("cpu"))


@pytest.fixture
def sent_updates(monkeypatch) -> list:
    """Every update the server receives, as it receives it: [(site, {name: array})] (the server's FedAvg, which
    every strategy averages or validates through)."""
    from nnunet_fed.federation import aggregation

    sent, original = [], aggregation.FedAvg.aggregate

    def recording_aggregate(self, global_arrays, updates):
        def tap():
            for u in updates:
                sent.append((u.site, {k: v.copy() for k, v in u.arrays.items()}))
                yield u
        return original(self, global_arrays, tap())

    monkeypatch.setattr(aggregation.FedAvg, "aggregate", recording_aggregate)
    return sent


def run_cli(args, env, timeout=600, check=True):
    """Run a console command (nnunet_fed, nnUNetv2_*) with the given nnU-Net folders."""
    full_env = {**os.environ, **env}
    proc = subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def cli(capsys, *args) -> tuple[int, str, str]:
    """``nnunet_fed ARGS`` in this process (its ``main``; the environment is the test's): exit code, stdout,
    stderr. Cheaper than :func:`run_cli` where only the command's own checks matter (no start-up of a new Python).
    The trainer folder the command adds to ``nnUNet_extTrainer`` is taken out again, so that later commands started
    as processes do not inherit it."""
    from nnunet_fed.cli import main

    before = os.environ.get("nnUNet_extTrainer")
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    finally:
        if before is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = before
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def nnunet_fed_cmd():
    return [sys.executable, "-m", "nnunet_fed.cli"]


def dp_accounting_epsilon(report: dict) -> float:
    """The total epsilon of a DP site's privacy_report.json (or ledger), recomputed with Google's dp_accounting
    (RDP) from its single releases (``events``) and training ``history``: an accountant independent of Opacus's."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    parts = []
    for kind, noise, q, count in report["events"]:
        single = dp_accounting.GaussianDpEvent(noise) if kind == "gaussian" else dp_accounting.LaplaceDpEvent(noise)
        if q < 1:
            single = dp_accounting.PoissonSampledDpEvent(q, single)
        parts.append(dp_accounting.SelfComposedDpEvent(single, int(count)))
    for z, q, n in report["history"]:
        parts.append(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), int(n)))
    return float(RdpAccountant().compose(dp_accounting.ComposedDpEvent(parts)).get_epsilon(report["delta"]))


def write_node_key(folder, name: str) -> tuple[str, str]:
    """A SuperNode key pair as ``ssh-keygen -t ecdsa -b 384`` makes it: (private key path, public key path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = os.path.join(folder, name), os.path.join(folder, name + ".pub")
    with open(private, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                  serialization.NoEncryption()))
    os.chmod(private, 0o600)
    with open(public, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def site_round_updates(site_env, server_fold: str, trainer: str, round_index: int) -> list:
    """Each fixture site's update of a round of the federation whose global model is in ``server_fold``: the shared
    arrays it trained and sent, from its round state file, with its num_examples (sites without that round's state
    are left out)."""
    import torch

    from nnunet_fed.federation.update import Update

    with open(os.path.join(server_fold, "federation_id")) as f:
        federation = f"{os.path.basename(os.path.dirname(os.path.dirname(server_fold)))}-{f.read().strip()}"
    out = []
    for name in site_env["names"]:
        fold = os.path.join(site_env["results"], name, f"{trainer}__nnUNetPlans__2d", "fold_0")
        path = os.path.join(fold, "federated_rounds", federation, f"round_{round_index:04d}.pth")
        if not os.path.isfile(path):
            continue
        state = torch.load(path, map_location="cpu", weights_only=False)
        released, w = state["released_update"], state["network_weights"]
        out.append(Update(name, {k: w[k].numpy().copy() for k in released["arrays"]}, released["num_examples"]))
    return out
