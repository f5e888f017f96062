"""Prediction and evaluation with nnU-Net's own predictor and metrics (what nnUNetv2_predict and
nnUNetv2_evaluate_folder run)."""
from __future__ import annotations

import os

import torch


def predict_folder(model_folder: str, input_folder: str, output_folder: str, fold=0, device: str = "cpu",
                   use_mirroring: bool = True, checkpoint_name: str = "checkpoint_final.pth") -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_fed.sites import ensure_trainer_path

    ensure_trainer_path()  # the checkpoint names an nnunet_fed trainer; nnU-Net must be able to find it
    dev = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(fold,), checkpoint_name=checkpoint_name)
    predictor.predict_from_files(input_folder, output_folder, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)


def evaluate_folder(reference_folder: str, prediction_folder: str, model_folder: str, num_processes: int = 2) -> dict:
    """nnU-Net's evaluation (``nnUNetv2_evaluate_folder``); returns the parsed summary.json."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2, load_summary_json

    out = os.path.join(prediction_folder, "summary.json")
    compute_metrics_on_folder2(reference_folder, prediction_folder, os.path.join(model_folder, "dataset.json"),
                               os.path.join(model_folder, "plans.json"), out, num_processes=num_processes,
                               chill=False)
    return load_summary_json(out)


def dice_per_label(summary: dict) -> dict[int, float]:
    """{label: mean Dice over cases} from an nnU-Net summary (labels as ints)."""
    out = {}
    for key, metrics in summary["mean"].items():
        out[int(key) if not isinstance(key, tuple) else key] = float(metrics["Dice"])
    return out
