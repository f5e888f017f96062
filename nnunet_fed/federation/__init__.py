"""Rounds, updates, sharing policies and aggregation, shared by simulation and deployment."""
from nnunet_fed.federation.update import SharingPolicy, Update
from nnunet_fed.federation.aggregation import FedAvg, UpdateRejected, check_update

__all__ = ["SharingPolicy", "Update", "FedAvg", "UpdateRejected", "check_update"]
