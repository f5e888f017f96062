"""Trainer options: defaults merged along the class hierarchy, environment variables, -o NAME=VALUE."""
import pytest

from nnunet_fed.cli import parse_options
from nnunet_fed.federation.trainer import nnUNetTrainerFederated


class _Base(nnUNetTrainerFederated):
    federated_options = {"clip": 1.0, "steps": 3, "adaptive": False, "mode": "gaussian"}


class _Child(_Base):
    federated_options = {"steps": 5, "tau": 0.75}


def test_defaults_merge_along_the_hierarchy():
    assert _Child.option_defaults() == {**nnUNetTrainerFederated.option_defaults(),  # local_momentum
                                        "clip": 1.0, "steps": 5, "adaptive": False, "mode": "gaussian", "tau": 0.75}


def test_environment_then_explicit_values_are_cast():
    env = {"nnUNet_fed_clip": "0.5", "nnUNet_fed_adaptive": "true", "nnUNet_fed_steps": ""}
    opts = _Child.resolve_options(parse_options(["steps=7", "mode=laplace"]), environ=env)
    assert opts == {**nnUNetTrainerFederated.option_defaults(),
                    "clip": 0.5, "steps": 7, "adaptive": True, "mode": "laplace", "tau": 0.75}


def test_schedule_and_options_come_from_one_kind_of_variable():
    from nnunet_fed.federation.trainer import environment_setting

    env = {"nnUNet_fed_rounds": "7", "nnUNet_fed_fedprox_mu": "0.1", "nnUNet_fed_val_steps": ""}
    assert environment_setting("rounds", 1000, env) == 7
    assert environment_setting("fedprox_mu", 0.0, env) == 0.1
    assert environment_setting("val_steps", 50, env) == 50  # empty: the default
    with pytest.raises(ValueError, match=r"nnUNet_fed_rounds='seven' is not a valid int"):
        environment_setting("rounds", 1000, {"nnUNet_fed_rounds": "seven"})
    with pytest.raises(ValueError, match=r"_Child: environment variable nnUNet_fed_clip='wide'"):
        _Child.resolve_options(environ={"nnUNet_fed_clip": "wide"})


def test_unknown_and_malformed_options_are_named():
    with pytest.raises(ValueError, match=r"_Child has no option sigma"):
        _Child.resolve_options({"sigma": "1"}, environ={})
    with pytest.raises(ValueError, match=r"steps='many'"):
        _Child.resolve_options({"steps": "many"}, environ={})
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_options(["steps"])


class _Mixin:
    federated_options = {"client_clip": 0.1}


class _Combined(_Mixin, _Child):  # no options of its own: nothing inherited twice, nothing overridden
    pass


def test_mixins_combine_without_overriding():
    assert _Combined.option_defaults() == {**_Child.option_defaults(), "client_clip": 0.1}
