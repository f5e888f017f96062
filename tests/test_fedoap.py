"""FedOAP: DCA bottleneck and adapters (2d/3d), perturbed boundary loss, local parameters never sent,
personalised checkpoints that nnUNetv2_predict rebuilds with no extra flags."""
import json
import os

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from scipy import ndimage

from conftest import cli, dp_accounting_epsilon, nnunet_fed_cmd, run_cli, site_trainer
from nnunet_fed.architectures import FEDOAP_LOCAL_PATTERNS, AdaptedHead, wrap_unet
from nnunet_fed.federation.update import SharingPolicy, tensor_aliases
from nnunet_fed.losses import PerturbedBoundaryLoss, boundary_band, wrap_with_pbl
from nnunet_fed.privacy.per_sample import CLIP_MARGIN

POLICY = SharingPolicy(FEDOAP_LOCAL_PATTERNS)


def _unet(dim=2, cls=PlainConvUNet, deep_supervision=True, classes=3):
    conv, norm = (torch.nn.Conv2d, torch.nn.InstanceNorm2d) if dim == 2 else (torch.nn.Conv3d, torch.nn.InstanceNorm3d)
    kwargs = dict(input_channels=1, n_stages=3, features_per_stage=(4, 8, 16), conv_op=conv, kernel_sizes=3,
                  strides=(1, 2, 2), num_classes=classes, n_conv_per_stage_decoder=(1, 1), conv_bias=True,
                  norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    kwargs["n_blocks_per_stage" if cls is ResidualEncoderUNet else "n_conv_per_stage"] = (1, 1, 1)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("cls", [PlainConvUNet, ResidualEncoderUNet])
def test_dca_shape_and_gradient_flow(dim, cls):
    torch.manual_seed(0)
    plain = _unet(dim, cls)
    shape = (2, 1) + ((16, 16) if dim == 2 else (8, 16, 16))
    x = torch.randn(shape)
    expected = [o.shape for o in plain(x)]
    net = wrap_unet(plain, num_heads=4)
    seen = {}
    net.dca.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].shape, out=o.shape))
    outputs = net(x)
    assert [o.shape for o in outputs] == expected  # deep supervision kept, same output shapes as nnU-Net's UNet
    assert seen["inp"] == seen["out"] == (2, 16) + tuple(s // 4 for s in shape[2:])  # deepest stage, 16 channels
    sum(o.float().pow(2).mean() for o in outputs).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # query branch, key/value branch, Wq/Wk/Wv/Wo, adapters, heads all receive gradient
    for s, layer in enumerate(net.decoder.seg_layers):
        assert isinstance(layer, AdaptedHead), s  # an adapter before every deep-supervision head
    # nnU-Net's predictor switches deep supervision off through decoder.deep_supervision
    net.decoder.deep_supervision = False
    out = net(x)
    assert torch.is_tensor(out) and out.shape == expected[0]


@pytest.mark.parametrize("dim", [2, 3])
def test_dca_is_multi_head_attention_over_bottleneck_positions(dim):
    """The DCA output equals Norm(Wo softmax(QK^T/sqrt(d)) V + Fq), written out independently."""
    torch.manual_seed(1)
    dca = wrap_unet(_unet(dim), num_heads=4).dca.eval()
    x = torch.randn((2, 16) + ((4, 4) if dim == 2 else (2, 4, 4)))
    fq, fkv = dca.query_branch(x), dca.kv_branch(x)
    b, c, n, h = x.shape[0], x.shape[1], int(np.prod(x.shape[2:])), dca.num_heads
    q, k, v = (w(f).reshape(b, h, c // h, n) for w, f in ((dca.wq, fq), (dca.wk, fkv), (dca.wv, fkv)))
    weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / (c // h) ** 0.5, dim=-1)
    attn = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(fq.shape)
    torch.testing.assert_close(dca(x), dca.norm(dca.wo(attn) + fq), rtol=1e-4, atol=1e-5)
    assert h == 4


def test_local_parameters_cover_every_alias():
    net = wrap_unet(_unet(2, ResidualEncoderUNet))
    shared, local = POLICY.classify(net)
    aliases = tensor_aliases(net)
    sent = {a for n in shared for a in aliases[n]}
    kept = {a for n in local for a in aliases[n]}
    assert not sent & kept
    for prefix in ("dca.query_branch.", "dca.wq.", "decoder.seg_layers.0.adapter.", "decoder.seg_layers.1.head."):
        assert any(k.startswith(prefix) for k in kept) and not any(s.startswith(prefix) for s in sent), prefix
    for prefix in ("dca.kv_branch.", "dca.wk.", "dca.wv.", "dca.wo.", "encoder.", "decoder.stages."):
        assert any(s.startswith(prefix) for s in sent), prefix
    # the query branch's conv blocks are listed again under .all_modules.: those names are local too
    assert any(".all_modules." in k and k.startswith("dca.query_branch.") for k in kept)


def test_adapter_only_before_the_final_head_and_unsupported_networks():
    net = wrap_unet(_unet(2), adapters="final")
    kinds = [isinstance(layer, AdaptedHead) for layer in net.decoder.seg_layers]
    assert kinds == [False] * (len(kinds) - 1) + [True]
    outputs = net(torch.randn(1, 1, 16, 16))
    assert [o.shape[-1] for o in outputs] == [16, 8]
    with pytest.raises(ValueError, match="PlainConvUNet or ResidualEncoderUNet"):
        wrap_unet(torch.nn.Conv2d(1, 3, 1))
    with pytest.raises(ValueError, match="adapters must be one of"):
        wrap_unet(_unet(2), adapters="some")


# ----------------------------------------------------------------------------------------------- PBL
def _dc_ce(ds=True):
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, [2 / 3, 1 / 3]) if ds else loss


def _multiscale(seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (2, 1, 16, 16), generator=g).float()
    logits = torch.randn((2, classes, 16, 16), generator=g)
    return [logits, logits[:, :, ::2, ::2].contiguous()], [target, target[:, :, ::2, ::2].contiguous()]


def test_pbl_equals_plain_loss_when_lambda_is_zero():
    logits, targets = _multiscale()
    plain = _dc_ce()
    torch.manual_seed(0)
    pbl = wrap_with_pbl(plain, lam=0.0, tau=0.0, sigma=5.0)  # every pixel would be perturbed, but lambda = 0
    assert torch.equal(pbl(logits, targets), plain(logits, targets))
    assert isinstance(pbl, DeepSupervisionWrapper) and pbl.weight_factors == plain.weight_factors


def test_pbl_equals_plain_loss_when_no_pixel_exceeds_tau():
    _, targets = _multiscale()
    # confident, correct predictions: 1 - p_true ~ 1e-4 <= tau everywhere
    logits = [10.0 * torch.nn.functional.one_hot(t[:, 0].long(), 3).movedim(-1, 1).float() for t in targets]
    plain = _dc_ce()
    pbl = wrap_with_pbl(plain, lam=0.5, tau=0.75, sigma=5.0)
    torch.testing.assert_close(pbl(logits, targets), plain(logits, targets), rtol=1e-6, atol=0)
    # the same predictions with one scale made wrong: now the loss differs
    wrong = [logits[0].roll(1, dims=1), logits[1]]
    assert not torch.allclose(pbl(wrong, targets), plain(wrong, targets))


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, logits, target):
        self.seen.append(logits.detach().clone())
        return logits.pow(2).mean()


def test_pbl_error_mask_noise_and_combination():
    logits, targets = _multiscale(seed=3)
    z, y = logits[0], targets[0]
    rec = _Recorder()
    pbl = PerturbedBoundaryLoss(rec, lam=0.25, tau=0.6, sigma=0.1)
    p = torch.softmax(z, 1)
    onehot = torch.nn.functional.one_hot(y[:, 0].long(), 3).movedim(-1, 1)
    mask = pbl.perturbation_mask(z, y)
    # 1 - p_true > tau is the same set as max over classes of |softmax - onehot| > tau
    assert torch.equal(mask, (1 - (p * onehot).sum(1, keepdim=True)) > 0.6)
    assert torch.equal(mask, ((p - onehot).abs() > 0.6).any(1, keepdim=True))
    assert 0 < mask.float().mean() < 1
    value = pbl(z, y)
    clean, perturbed = rec.seen
    delta = (perturbed - clean).abs()
    assert torch.equal(clean, z)
    assert (delta[mask.expand_as(delta)] > 0).all() and (delta[~mask.expand_as(delta)] == 0).all()
    assert 0.05 < delta[mask.expand_as(delta)].std() < 0.2  # N(0, 0.1^2)
    torch.testing.assert_close(value, 0.75 * clean.pow(2).mean() + 0.25 * perturbed.pow(2).mean())


def test_pbl_band_variant_matches_distance_transform():
    y = torch.zeros(1, 1, 20, 20)
    y[0, 0, 5:15, 4:12] = 1
    y[0, 0, 8:11, 6:9] = 2
    band = boundary_band(y, 2)[0, 0].numpy()
    lab = y[0, 0].numpy()
    expected = np.zeros_like(band)
    for value in np.unique(lab):  # a pixel of label v lies within 2 (chessboard) of a pixel of another label
        dist = ndimage.distance_transform_cdt(lab == value, metric="chessboard")
        expected |= (lab == value) & (dist <= 2)
    assert 0 < expected.mean() < 1
    assert np.array_equal(band, expected)
    pbl = PerturbedBoundaryLoss(_dc_ce(False), band=2)
    assert torch.equal(pbl.perturbation_mask(torch.randn(1, 3, 20, 20), y)[0, 0], torch.from_numpy(band))


def test_pbl_regions_use_sigmoid_per_channel():
    g = torch.Generator().manual_seed(5)
    target = (torch.rand((2, 2, 12, 12), generator=g) > 0.5).float()
    logits = torch.randn((2, 2, 12, 12), generator=g) * 3
    loss = DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           dice_class=MemoryEfficientSoftDiceLoss)
    pbl = PerturbedBoundaryLoss(loss, lam=0.1, regions=True)
    mask = pbl.perturbation_mask(logits, target)
    assert mask.shape == logits.shape
    assert torch.equal(mask, (torch.sigmoid(logits) - target).abs() > 0.75)
    assert torch.isfinite(pbl(logits, target))


# ----------------------------------------------------------------------------------------------- end to end
FED_NAME = "DatasetFed_201_202_203"
TRAINER = "nnUNetTrainerFedOAP"


def test_fedoap_simulation_sends_no_local_parameter_and_predicts_per_site(site_env, monkeypatch, tmp_path,
                                                                           sent_updates):
    from nnunet_fed.federation.records import load_server_state
    from nnunet_fed.federation.simulation import SimulationConfig, simulate

    sent = sent_updates
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    out = simulate(SimulationConfig(dataset_ids=site_env["ids"], configuration="2d", trainer=TRAINER, rounds=2,
                                    local_steps=2, val_steps=1, device="cpu", final_validation=False,
                                    progress=False, trainer_options={"finetune_steps": "3"}))
    assert len(sent) == 2 * 3
    site_weights = {}
    for name, folder in out["site_folders"].items():
        ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu",
                          weights_only=False)
        assert ckpt["trainer_name"] == TRAINER
        site_weights[name] = ckpt["network_weights"]
        with open(os.path.join(folder, "finetune.json")) as f:
            rec = json.load(f)
        assert rec["steps"] == 3 and len(rec["losses"]) == 3 and rec["pbl_lambda"] == 0.1
    names = list(site_weights)
    state = site_weights[names[0]]
    local_names = [k for k in state if POLICY.is_local(k)]
    assert any(k.startswith("dca.wq.") for k in local_names) and any("adapter" in k for k in local_names)
    for site, arrays in sent:
        assert arrays, site
        assert not [k for k in arrays if POLICY.is_local(k)]
        assert not [k for k in arrays if k.startswith("decoder.encoder.") or ".all_modules." in k]  # one name each
        assert {k for k in state if not POLICY.is_local(k)} >= set(arrays)
    # the server never held a local parameter, and writes no "global" model for a personalised trainer
    fold = os.path.join(site_env["results"], FED_NAME, f"{TRAINER}__nnUNetPlans__2d", "fold_0")
    assert not [k for k in load_server_state(fold)["global_arrays"] if POLICY.is_local(k)]
    assert out["global_checkpoint"] is None and not os.path.exists(os.path.join(fold, "checkpoint_final.pth"))
    # local parameters are personal: they differ between sites
    for k in ("dca.wq.weight", "decoder.seg_layers.1.head.weight", "decoder.seg_layers.0.adapter.conv1.weight"):
        assert not torch.equal(site_weights[names[0]][k], site_weights[names[1]][k]), k

    # nnUNetv2_predict rebuilds the personal network from site 0's checkpoint with no extra flags
    env = {**site_env["env"], "nnUNet_extTrainer": run_cli(nnunet_fed_cmd() + ["trainer-path"], {}).stdout.strip()}
    raw = os.path.join(env["nnUNet_raw"], names[0])
    pred = str(tmp_path / "pred")
    run_cli(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", pred, "-d", site_env["ids"][0],
             "-tr", TRAINER, "-c", "2d", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env)
    import SimpleITK as sitk

    files = sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz"))
    assert len(files) == len(os.listdir(os.path.join(raw, "labelsTs")))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred, files[0])))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "labelsTs", files[0])))
    assert seg.shape == ref.shape and set(np.unique(seg)) <= {0, 1, 2}


def test_get_shared_arrays_leave_local_parameters_alone(site_env):
    trainer = site_trainer(site_env, TRAINER)
    trainer.initialize()
    net = trainer.plain_network
    arrays = trainer.get_shared_arrays()
    aliases = tensor_aliases(net)
    local_aliases = {a for n in trainer.local_parameter_names() for a in aliases[n]}
    assert local_aliases and not local_aliases & set(arrays)
    assert not any(POLICY.is_local(k) for k in arrays)
    # loading global arrays changes every name of the shared tensors and no local tensor
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer.set_shared_arrays({k: v + 1.0 for k, v in arrays.items()})
    after = net.state_dict()
    for k in after:
        if k in local_aliases:
            assert torch.equal(after[k], before[k]), k
        elif after[k].is_floating_point():
            torch.testing.assert_close(after[k], before[k] + 1.0)


def test_bad_fedoap_option_is_named_before_training(site_env, capsys):
    code, _, err = cli(capsys, "simulate", "-d", *site_env["ids"], "-c", "2d", "-tr", TRAINER, "--device", "cpu",
                       "-o", "pbl_tau=1.5", "-o", "finetune_steps=-1")
    assert code == 2
    assert "pbl_tau must lie in [0, 1), got 1.5" in err and "finetune_steps must be >= 0" in err
    assert os.listdir(site_env["results"]) == []


# ----------------------------------------------------------------------------------------------- FedOAP + ADP-FL
@pytest.mark.parametrize("dim", [2, 3])
def test_per_case_clipping_is_exact_on_the_fedoap_network(dim):
    """DCA (attention over positions) and adapters keep cases independent: the clipped sum of the DP step equals
    single-case backward passes, each clipped (float64), with PBL's loss as the per-case loss."""
    from nnunet_fed.privacy.per_sample import PerSampleClipper

    torch.manual_seed(0)
    net = wrap_unet(_unet(dim, ResidualEncoderUNet), num_heads=4).double()
    batch, clip = 3, 0.05
    x = torch.randn((batch, 1) + ((16, 16) if dim == 2 else (8, 16, 16)), dtype=torch.float64)
    with torch.no_grad():
        ys = [torch.randint(0, 3, (batch, 1, *o.shape[2:])).double() for o in net(x)]
    pbl = wrap_with_pbl(_dc_ce(), lam=0.5, tau=0.0, sigma=0.3)

    def case_losses(out, indices):  # output rows j belong to cases indices[j]
        losses = []
        for j, i in enumerate(indices):
            torch.manual_seed(100 + i)  # the same PBL noise for case i in the batched and the single-case pass
            losses.append(pbl([o[j:j + 1] for o in out], [y[i:i + 1] for y in ys]))
        return torch.stack(losses)

    acc, norms, _ = PerSampleClipper(net).clipped_sum(x, case_losses, clip)
    ref = {p: torch.zeros_like(p) for p in net.parameters()}
    for i in range(batch):
        net.zero_grad(set_to_none=True)
        out = net(x[i:i + 1])
        torch.manual_seed(100 + i)
        pbl(list(out), [y[i:i + 1] for y in ys]).backward()
        n = torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters() if p.grad is not None))
        torch.testing.assert_close(norms[i], n, rtol=1e-9, atol=1e-12)
        for p in net.parameters():
            if p.grad is not None:
                ref[p] += p.grad * min(1.0, clip / (float(n) * (1 + CLIP_MARGIN)))
    assert float(norms.min()) > clip
    clipped = {id(p) for p in acc}
    assert any(k.startswith("dca.wq") and id(p) in clipped for k, p in net.named_parameters())  # local ones too
    for p in net.parameters():
        torch.testing.assert_close(acc.get(p, torch.zeros_like(p)), ref[p], rtol=1e-9, atol=1e-12)


def test_fedoap_adp_is_private_end_to_end_and_accounts_fine_tuning(site_env, monkeypatch, sent_updates):
    """nnUNetTrainerFedOAP_ADP: no local parameter is sent; the noise is calibrated over rounds x steps + the
    fine-tuning steps, which run as DP steps with PBL; the epsilon of each site's report is reproduced by
    dp_accounting from the report's history; the round metrics show the spending before fine-tuning."""
    from nnunet_fed.federation.simulation import SimulationConfig, simulate

    sent = sent_updates
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer, rounds, steps, finetune = "nnUNetTrainerFedOAP_ADP", 2, 2, 3
    out = simulate(SimulationConfig(dataset_ids=site_env["ids"], configuration="2d", trainer=trainer, rounds=rounds,
                                    local_steps=steps, val_steps=1, device="cpu", final_validation=False,
                                    progress=False, trainer_options={"finetune_steps": str(finetune),
                                                                     "target_epsilon": "4", "expected_batch_size": "3",
                                                                     "public_plans": "true"}))
    assert len(sent) == rounds * 3
    for site, arrays in sent:
        assert arrays and not [k for k in arrays if POLICY.is_local(k)], site
    last_round = out["metrics"][-1]["sites"]
    for name, folder in out["site_folders"].items():
        with open(os.path.join(folder, "privacy_report.json")) as f:
            rep = json.load(f)
        assert rep["steps"] == rounds * steps + finetune and rep["adaptive_clip"]
        assert sum(n for _, _, n in rep["history"]) == rep["steps"]
        # calibrated to the whole schedule: the target is reached after fine-tuning, not before
        assert 0.9 * 4 <= rep["epsilon"] <= 4.0
        assert last_round[name]["epsilon"] < rep["epsilon"]
        # the total (noisy case count + every step) by an independent accountant
        assert rep["epsilon"] == pytest.approx(dp_accounting_epsilon(rep), rel=0.01)
        with open(os.path.join(folder, "finetune.json")) as f:
            rec = json.load(f)
        # the fine-tuning losses are not privatised: they stay in the site's log, not in finetune.json
        assert rec["steps"] == finetune and not isinstance(rec["losses"], list) and rec["pbl_lambda"] == 0.1
        ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
        assert ckpt["trainer_name"] == trainer
    assert out["global_checkpoint"] is None
