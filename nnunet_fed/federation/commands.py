"""The nnU-Net commands nnunet_fed prints for what comes next (``simulate``, ``server``), written so that they run
as printed in a POSIX shell.

nnU-Net finds trainers outside its own package only through ``nnUNet_extTrainer``, which the nnunet_fed commands
set for themselves but a user's shell usually does not have: the printed ``nnUNetv2_predict`` therefore sets it
in front of the command (``nnUNet_extTrainer=<nnunet_fed's trainer folder> nnUNetv2_predict ...``).
"""
from __future__ import annotations

import os
import shlex

import nnunet_fed


def trainer_path_value() -> str:
    """What ``nnUNet_extTrainer`` must hold: nnunet_fed's trainer folder, then the folders already set."""
    folder = nnunet_fed.trainer_folder()
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != folder]
    return os.pathsep.join([folder] + current)


def predict_command(dataset: str, trainer: str, plans: str, configuration: str, fold, device: str | None = None,
                    images: str = "<images>", output: str = "<output>") -> str:
    """``nnUNetv2_predict`` for a trained model, runnable as printed (placeholders ``<images>``, ``<output>`` and,
    for ``dataset``, e.g. ``<site>`` are for the user to fill in). ``device`` adds ``-device`` (nnU-Net's default
    is cuda)."""
    parts = [f"nnUNet_extTrainer={shlex.quote(trainer_path_value())}", "nnUNetv2_predict", "-d", dataset,
             "-tr", trainer, "-p", plans, "-c", configuration, "-f", str(fold)]
    if device:
        parts += ["-device", device]
    return " ".join(parts + ["-i", images, "-o", output])
