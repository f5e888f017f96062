"""What a round does to nnU-Net's optimizer state, the Flower server rules inside a real simulation, and the
personalisation baselines' wire contract (FedBN: normalisation layers local; FedPer: segmentation heads local)."""
import os

import numpy as np
import pytest
import torch

from conftest import site_trainer
from nnunet_fed.federation.update import NORMALIZATION_LAYERS, tensor_aliases


def _trainer(site_env, options):
    trainer = site_trainer(site_env, "nnUNetTrainerFedPer", rounds=3, local_steps=2, val_steps=1,
                           trainer_options=options)
    trainer.on_train_start()
    return trainer


@pytest.mark.parametrize("rule", ["reset", "keep"])
def test_momentum_of_shared_parameters_at_round_start(site_env, monkeypatch, rule):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(site_env, {"local_momentum": rule})
    try:
        trainer.run_round(trainer.get_shared_arrays())
        params = dict(trainer.plain_network.named_parameters())
        shared, local = trainer.shared_parameter_names(), trainer.local_parameter_names()
        # (a deep-supervision head whose loss weight is 0 gets no gradient and so no buffer)
        buffers = {n: trainer.optimizer.state[params[n]]["momentum_buffer"].clone() for n in shared + local
                   if n in params and "momentum_buffer" in trainer.optimizer.state[params[n]]}
        shared = [n for n in shared if n in buffers]
        local = [n for n in local if n in buffers]
        assert len(shared) > 20 and local  # one round of nnU-Net's SGD filled them
        assert all(b.abs().sum() > 0 for b in buffers.values())
        trainer.on_round_start(trainer.get_shared_arrays())
        for n in shared:
            state = trainer.optimizer.state[params[n]]
            if rule == "reset":
                assert "momentum_buffer" not in state, n
            else:
                torch.testing.assert_close(state["momentum_buffer"], buffers[n])
        for n in local:  # a site's own parameters keep their momentum under either rule
            torch.testing.assert_close(trainer.optimizer.state[params[n]]["momentum_buffer"], buffers[n])
        trainer.train_round()  # torch's SGD starts the dropped buffers again from the next gradient
        assert all("momentum_buffer" in trainer.optimizer.state[params[n]] for n in shared)
    finally:
        trainer.on_train_end()


def test_momentum_rule_is_checked(site_env):
    from nnunet_fed.federation.simulation import SimulationConfig, prepare

    with pytest.raises(ValueError, match="local_momentum='average' is not one of"):
        prepare(SimulationConfig(dataset_ids=site_env["ids"][:1], configuration="2d", device="cpu", progress=False,
                                 trainer_options={"local_momentum": "average"}))


@pytest.mark.parametrize("trainer,strategy", [("nnUNetTrainerFedBN", "fedavgm"), ("nnUNetTrainerFedPer", "fedadam")])
def test_personalisation_baseline_keeps_its_local_parameters(site_env, monkeypatch, sent_updates, trainer,
                                                             strategy):
    """A simulation with a Flower server rule: what leaves each site has no local tensor under any of its names,
    the server's state has none, sites end with different local values, and the rule's state is saved."""
    from nnunet_fed.federation.records import load_server_state
    from nnunet_fed.federation.simulation import SimulationConfig, simulate
    from nnunet_fed.sites import find_trainer

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    sent = sent_updates
    options = {"server_momentum": "0.9"} if strategy == "fedavgm" else {"eta": "0.001"}
    out = simulate(SimulationConfig(dataset_ids=site_env["ids"], configuration="2d", trainer=trainer, rounds=2,
                                    local_steps=2, val_steps=1, device="cpu", final_validation=False,
                                    progress=False, strategy=strategy, strategy_options=options))
    assert len(sent) == 2 * 3 and out["global_checkpoint"] is None  # personal models, no global one
    folders = out["site_folders"]
    weights = {s: torch.load(os.path.join(f, "checkpoint_final.pth"), map_location="cpu",
                             weights_only=False)["network_weights"] for s, f in folders.items()}
    t = site_trainer(site_env, trainer)
    t.initialize()
    net = t.plain_network
    aliases = tensor_aliases(net)
    local = {a for n in t.local_parameter_names() for a in aliases[n]}
    if trainer == "nnUNetTrainerFedBN":  # every normalisation layer's scale and shift, under all its names
        norm_ids = {id(p) for m in net.modules() if isinstance(m, NORMALIZATION_LAYERS) for p in m.parameters()}
        state = net.state_dict(keep_vars=True)
        assert norm_ids and local == {k for k, v in state.items() if id(v) in norm_ids}
    else:
        assert local == {k for k in net.state_dict() if k.startswith("decoder.seg_layers.")}
    assert find_trainer(trainer).sharing_policy.classify(net)[1]
    for site, arrays in sent:
        assert arrays and not set(arrays) & local, site
    fold = os.path.join(site_env["results"], out["federation_name"], f"{trainer}__nnUNetPlans__2d", "fold_0")
    state = load_server_state(fold)
    assert not set(state["global_arrays"]) & local
    names = sorted(weights)
    # personal values (a deep-supervision head without loss weight gets no gradient and stays as initialised)
    assert any(not torch.equal(weights[names[0]][k], weights[names[1]][k]) for k in local & set(weights[names[0]]))
    key = "momentum_vector" if strategy == "fedavgm" else "m_t"
    assert state["strategy_state"]["server_round"] == 2 and state["strategy_state"][key]
    # the shared part is the same at every site (the final global arrays)
    shared = sorted(set(state["global_arrays"]))
    for n in shared[:5]:
        np.testing.assert_array_equal(weights[names[0]][n].numpy(), state["global_arrays"][n])
        np.testing.assert_array_equal(weights[names[1]][n].numpy(), state["global_arrays"][n])


def test_ditto_sends_the_global_model_and_keeps_the_personal_one(site_env, monkeypatch, sent_updates):
    """Ditto: what leaves a site is its copy of the global model; the personal model (pulled towards the global
    one) never does, is each site's final model, and differs between sites; the global model is written."""
    from nnunet_fed.federation.simulation import SimulationConfig, simulate

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    sent = sent_updates
    out = simulate(SimulationConfig(dataset_ids=site_env["ids"][:2], configuration="2d", trainer="nnUNetTrainerDitto",
                                    rounds=2, local_steps=2, val_steps=1, device="cpu", final_validation=False,
                                    progress=False, trainer_options={"ditto_lambda": "0.5", "ditto_steps": "3"}))
    assert len(sent) == 2 * 2 and out["global_checkpoint"] is not None
    final = {s: torch.load(os.path.join(f, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
             for s, f in out["site_folders"].items()}
    glob = torch.load(out["global_checkpoint"], map_location="cpu", weights_only=False)["network_weights"]
    for site, ck in final.items():
        personal = ck["network_weights"]
        torch.testing.assert_close(personal, ck["ditto_personal_weights"])
        assert any(not torch.equal(personal[k], glob[k]) for k in glob)  # the personal model is not the global one
        for s, arrays in sent:  # no update carries the personal weights
            if s == site:
                assert any(not np.array_equal(arrays[k], personal[k].numpy()) for k in arrays)
        # personal SGD steps: ditto_steps per round (nnU-Net's logger counts the global model's)
        assert len(ck["logging"]["train_losses"]) == 2
    a, b = sorted(final)
    assert any(not torch.equal(final[a]["network_weights"][k], final[b]["network_weights"][k]) for k in glob)
    # the global model is the weighted mean of the last round's updates (the sites' global copies)
    weights = {s: m["num_examples"] for s, m in out["metrics"][-1]["sites"].items()}
    for k in list(sent[-1][1])[:10]:
        mean = sum(weights[s] * arrays[k].astype(np.float64) for s, arrays in sent[-2:]) / sum(weights.values())
        np.testing.assert_allclose(glob[k].numpy(), mean, rtol=1e-5, atol=1e-6)
