"""Which tensors a site sends: one name per tensor, local parameters never, aliases classified consistently."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_fed.federation.update import SharingPolicy, tensor_aliases


def _unet(cls=PlainConvUNet):
    kwargs = dict(input_channels=1, n_stages=3, features_per_stage=(4, 8, 16), conv_op=torch.nn.Conv2d,
                  kernel_sizes=3, strides=(1, 2, 2), num_classes=3, n_conv_per_stage_decoder=(1, 1),
                  conv_bias=True, norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    kwargs["n_blocks_per_stage" if cls is ResidualEncoderUNet else "n_conv_per_stage"] = (1, 1, 1)
    return cls(**kwargs)


@pytest.mark.parametrize("cls", [PlainConvUNet, ResidualEncoderUNet])
def test_each_tensor_is_sent_once(cls):
    net = _unet(cls)
    shared, local = SharingPolicy().classify(net)
    assert local == []
    # nnU-Net's UNets list the encoder twice (encoder.*, decoder.encoder.*) and conv layers again as all_modules.*
    assert len(net.state_dict()) > len(shared)
    expected = [n for n, _ in net.named_parameters()] + [n for n, _ in net.named_buffers()]
    assert sorted(shared) == sorted(expected)
    assert not any(n.startswith("decoder.encoder.") or ".all_modules." in n for n in shared)


def test_local_tensor_is_not_sent_under_an_alias():
    net = _unet()
    policy = SharingPolicy([r"decoder\.seg_layers\."])
    shared, local = policy.classify(net)
    assert local and all(n.startswith("decoder.seg_layers.") for n in local)
    aliases = tensor_aliases(net)
    sent = {a for n in shared for a in aliases[n]}
    assert not any(a.startswith("decoder.seg_layers.") for a in sent)


def test_aliases_classified_differently_are_refused():
    net = _unet()
    # encoder.* is local but the same tensors are also reachable as decoder.encoder.*
    with pytest.raises(ValueError, match="decoder.encoder.stages"):
        SharingPolicy([r"encoder\."]).classify(net)
    shared, local = SharingPolicy([r"(decoder\.)?encoder\."]).classify(net)
    assert local and not any(n.startswith(("encoder.", "decoder.encoder.")) for n in shared)
