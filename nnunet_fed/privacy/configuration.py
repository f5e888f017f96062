"""DP-aware choice of the logical batch: given the target epsilon, the site's (noisy) number of cases and the step
schedule, which expected batch size and noise multiplier to train with. :func:`schedule_configuration` records the
rest (noise multiplier, steps, learning rate) with the reason for each. A reason names the rule and public settings
only; every value computed from the site's noisy case count (B, q, sigma, eta) is in a field of its own, so the
report's text is the same for neighbouring datasets.

Two rules. The default (``batch_rule=largest``, :func:`largest_batch_configuration`) takes the largest expected
batch the compute cap ``max_expected_batch`` and the site allow; ``batch_rule=tan`` (:func:`choose_expected_batch`)
takes the smallest batch whose total amount of noise is within 10 % of the best, trading a little noise for
compute. Both read only public values.

The rule follows Sander et al. 2023 ("TAN without a burn: scaling laws of DP-SGD"): at a fixed number of steps
and a fixed privacy budget, what DP-SGD's utility depends on is the total amount of noise,
``eta = sigma / B`` (noise multiplier over expected batch size: the noise std on the averaged gradient, in clip
units). Larger batches lower ``eta`` until sigma reaches the regime where it grows in proportion to the batch,
after which more cases per step cost compute for almost no gain. So: compute ``sigma(B)`` with the accountant for
each candidate ``B`` (nnU-Net's physical batch times 1, 2, 4, ... up to ``max_expected_batch`` and half the
site's noisy case count), and take the smallest ``B`` whose ``eta`` is within ``tolerance`` (10 %) of the best
candidate's. Every candidate's ``sigma``, ``eta`` and planned epsilon goes into the site's privacy report, with the
reason for the choice. The rule reads only public values (options, schedule, the released noisy case count).

Opacus offers the calibration (``get_noise_multiplier``, used by :func:`nnunet_fed.privacy.accountant.calibrate`)
but no rule for the batch; Sander et al. give the rule, not code.
"""
from __future__ import annotations

from nnunet_fed.privacy import accountant as acct


def sampling_rate(expected_batch: float, noisy_cases: float) -> float:
    """``q = B / max(N~, B)``: the Poisson sampling rate of an expected logical batch ``B`` at a site whose released
    (noisy) case count is ``N~`` (at most 1)."""
    return float(expected_batch) / max(float(noisy_cases), float(expected_batch))


def largest_expected_batch(physical_batch: int, noisy_cases: float, max_expected_batch: float) -> float:
    """``min(max_expected_batch, noisy_cases / 2)``, and at least the physical batch (the noisy count of a small site
    may be below it, even negative): the largest expected logical batch the rules consider. At a fixed number of
    steps and a fixed epsilon, ``eta = sigma(B) / B`` does not grow with ``B`` (Sander et al. 2023, Fig. 1; on
    this project's schedules it falls or stays level up to q = 1/2), so this is the default expected batch of the
    DP trainers: the least noise per averaged gradient at a compute cost per step of ``max_expected_batch`` cases."""
    return max(float(physical_batch), min(float(max_expected_batch), float(noisy_cases) / 2.0))


def largest_batch_configuration(physical_batch: int, noisy_cases: float, max_expected_batch: float) -> dict:
    """The default rule (``batch_rule=largest``) as the privacy report records it: ``{"expected_batch_size",
    "sampling_rate", "rule", "reason"}`` (the noise multiplier is calibrated afterwards from this ``q``)."""
    b = largest_expected_batch(physical_batch, noisy_cases, max_expected_batch)
    q = sampling_rate(b, noisy_cases)
    reason = (f"the largest expected batch up to max_expected_batch={float(max_expected_batch):g} and half the noisy "
              f"case count, at least the physical batch {physical_batch}: at a fixed number of steps and epsilon the "
              f"total amount of noise sigma / B does not grow with B (Sander et al. 2023)")
    return {"expected_batch_size": b, "sampling_rate": q, "rule": "largest", "reason": reason}


def schedule_configuration(noise_multiplier: float, target_epsilon: float | None, rounds: int, local_steps: int,
                           extra_steps: int, initial_lr: float, accountant: str, noise_set_by_user: bool) -> dict:
    """The rest of the configuration as the privacy report records it, each with its reason:
    ``{"noise": {"noise_multiplier", "reason"}, "steps": {"rounds", "local_steps", "steps_after_rounds", "total",
    "reason"}, "learning_rate": {"initial_lr", "schedule", "reason"}}``.

    The steps and the learning rate are not chosen by a DP rule: the steps are the federation's schedule (nnU-Net's
    ``num_epochs`` as rounds, ``num_iterations_per_epoch`` as local steps) and the noise is calibrated over all of
    them; the learning rate is nnU-Net's, which ``benchmarks/privacy_utility.py`` measured with these rules. The
    report says so rather than leaving the reader to guess."""
    total = int(rounds) * int(local_steps) + int(extra_steps)
    after = f" + {int(extra_steps)} steps after the rounds" if extra_steps else ""
    if noise_set_by_user:
        noise = (f"set by the user; the {accountant} accountant plans the epsilon of the {total} steps and the site's "
                 f"single releases (planned_epsilon)")
    else:
        noise = (f"the smallest noise multiplier whose planned epsilon over the {total} steps and the site's single "
                 f"releases (noisy case count, DP planning if any) is at most target_epsilon={target_epsilon:g}, "
                 f"calibrated with the {accountant} accountant (planned_epsilon)")
    steps = (f"{rounds} rounds x {local_steps} local steps{after} = {total}: the federation's schedule (rounds and "
             f"--local-steps, nnU-Net's num_epochs and num_iterations_per_epoch), not shortened by this rule; the "
             f"noise is calibrated over all of it, so more steps at the same epsilon mean more noise per step")
    lr = (f"nnU-Net's initial learning rate {initial_lr:g} with its poly decay over the rounds, unchanged under DP: "
          f"the noise on the averaged gradient is set by sigma / B above, and benchmarks/privacy_utility.py measured "
          f"the DP trainers with nnU-Net's learning rate")
    return {"noise": {"noise_multiplier": noise_multiplier, "reason": noise},
            "steps": {"rounds": int(rounds), "local_steps": int(local_steps), "steps_after_rounds": int(extra_steps),
                      "total": total, "reason": steps},
            "learning_rate": {"initial_lr": float(initial_lr), "schedule": "poly", "reason": lr}}


def batch_candidates(physical_batch: int, noisy_cases: float, max_expected_batch: float) -> list[float]:
    """``physical_batch * 2**k`` up to :func:`largest_expected_batch`, and at least the physical batch."""
    cap = largest_expected_batch(physical_batch, noisy_cases, max_expected_batch)
    out, b = [], float(physical_batch)
    while b <= cap * (1 + 1e-9):
        out.append(b)
        b *= 2.0
    return out


def choose_expected_batch(target_epsilon: float, delta: float, noisy_cases: float, physical_batch: int,
                          steps_per_round: int, rounds: int, max_expected_batch: float = 256.0,
                          tolerance: float = 0.1, accountant: str = "rdp", mechanism: str = "gaussian",
                          decay: float = 1.0, extra_steps: int = 0, events=(), max_noise_multiplier: float = 50.0
                          ) -> dict:
    """The expected logical batch by the total-amount-of-noise rule (module docstring).

    Returns ``{"expected_batch_size", "sampling_rate", "noise_multiplier", "eta", "candidates": [{B, q, sigma,
    eta, epsilon}], "rule", "reason"}``; ``sigma`` is the whole mechanism's multiplier (with adaptive clipping the
    gradient gets a little less, the same share at every ``B``, so the ranking holds). Candidates the accountant
    cannot meet (noise above ``max_noise_multiplier``) are listed with ``sigma`` None. Raises
    :class:`~nnunet_fed.privacy.accountant.BudgetError` when none can."""
    rows = []
    for b in batch_candidates(physical_batch, noisy_cases, max_expected_batch):
        q = sampling_rate(b, noisy_cases)
        try:
            sigma = acct.calibrate(target_epsilon, delta, q, steps_per_round, rounds, accountant, mechanism, decay,
                                   max_noise_multiplier, extra_steps=extra_steps, events=events)
        except acct.BudgetError:
            rows.append({"expected_batch_size": b, "sampling_rate": q, "noise_multiplier": None, "eta": None,
                         "epsilon": None})
            continue
        eps = acct.epsilon(acct.planned_schedule(sigma, q, steps_per_round, rounds, decay, extra_steps), delta,
                           accountant, mechanism, events)
        rows.append({"expected_batch_size": b, "sampling_rate": q, "noise_multiplier": sigma,
                     "eta": sigma / b, "epsilon": eps})
    feasible = [r for r in rows if r["eta"] is not None]
    if not feasible:
        raise acct.BudgetError(f"target epsilon {target_epsilon:g}: no expected batch size from {physical_batch} to "
                               f"{rows[-1]['expected_batch_size']:g} meets it within max_noise_multiplier="
                               f"{max_noise_multiplier:g} over {rounds} rounds x {steps_per_round} steps")
    best = min(r["eta"] for r in feasible)
    chosen = next(r for r in feasible if r["eta"] <= best * (1.0 + tolerance))
    reason = (f"total amount of noise eta = sigma / B (Sander et al. 2023) at {rounds} x {steps_per_round} steps and "
              f"epsilon {target_epsilon:g}: the smallest candidate batch (the physical batch {physical_batch} x 1, 2, "
              f"4, ... up to max_expected_batch={float(max_expected_batch):g} and half the noisy case count) whose eta "
              f"is within {tolerance:.0%} of the lowest candidate's (each candidate's sigma and eta: candidates)")
    return {**chosen, "candidates": rows, "rule": "tan", "reason": reason}
