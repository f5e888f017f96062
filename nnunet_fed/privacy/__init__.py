"""Differential privacy for nnU-Net: exact per-case clipping, Poisson sampling of cases, accountants, adaptive clipping."""
