"""Losses around nnU-Net's own (FedOAP's perturbed boundary loss)."""
from nnunet_fed.losses.pbl import PerturbedBoundaryLoss, boundary_band, wrap_with_pbl

__all__ = ["PerturbedBoundaryLoss", "boundary_band", "wrap_with_pbl"]
