"""The federation's settings as a Flower run config (``[tool.flwr.app.config]`` in app/pyproject.toml)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# run-config key -> RunSettings field; the defaults are those of app/pyproject.toml
KEYS = {
    "trainer": "trainer", "configuration": "configuration", "plans": "plans", "fold": "fold",
    "rounds": "rounds", "local-steps": "local_steps", "val-steps": "val_steps", "fedprox-mu": "fedprox_mu",
    "trainer-options": "trainer_options", "seed": "seed", "federation-name": "federation_name",
    "min-sites": "min_sites", "round-timeout": "round_timeout",
    "wait-for-sites": "wait_for_sites", "round-retries": "round_retries", "final-validation": "final_validation",
    "fresh": "fresh", "strategy": "strategy", "strategy-options": "strategy_options",
    "secure-aggregation": "secure_aggregation", "secagg-clip-range": "secagg_clip_range",
    "secagg-max-weight": "secagg_max_weight",
}
_JSON_KEYS = ("trainer_options", "strategy_options")


@dataclass
class RunSettings:
    trainer: str = "nnUNetTrainerFedAvg"
    configuration: str = "2d"
    plans: str = "nnUNetPlans"
    fold: str = "0"
    rounds: int = 5
    local_steps: int = 50
    val_steps: int = 10
    fedprox_mu: float = 0.0
    trainer_options: dict = field(default_factory=dict)
    seed: int = 12345
    federation_name: str = "DatasetFed_flower"
    min_sites: int = 2
    round_timeout: float = 3600.0
    wait_for_sites: float = 600.0
    round_retries: int = 3
    final_validation: bool = True
    fresh: bool = False
    strategy: str = "fedavg"
    strategy_options: dict = field(default_factory=dict)
    secure_aggregation: bool = False  # SecAgg+ (nnunet_fed.deployment.secure_aggregation)
    secagg_clip_range: float = 8.0  # values of a site's (weighted) update must lie in +-this
    secagg_max_weight: float = 10000.0  # largest num_examples of a site under secure FedAvg

    @classmethod
    def from_run_config(cls, run_config) -> "RunSettings":
        unknown = sorted(set(run_config) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown run config key(s) {unknown}; known: {sorted(KEYS)}")
        values = {KEYS[k]: v for k, v in run_config.items()}
        for attr in _JSON_KEYS:
            if isinstance(values.get(attr), str):
                text = values[attr].strip()
                try:
                    values[attr] = json.loads(text) if text else {}
                except json.JSONDecodeError:
                    raise ValueError(f"run config {attr.replace('_', '-')}={text!r} is not a JSON object") from None
        s = cls(**values)
        s.strategy = str(s.strategy).lower()
        s.fold = str(s.fold)
        for name in ("rounds", "local_steps", "val_steps", "min_sites", "round_retries", "seed"):
            setattr(s, name, int(getattr(s, name)))
        if s.rounds < 1 or s.local_steps < 1 or s.val_steps < 1 or s.min_sites < 1:
            raise ValueError(f"rounds, local-steps, val-steps and min-sites must be >= 1 ({s})")
        s.secure_aggregation = s.secure_aggregation in (True, 1, "true", "True", "1")
        s.secagg_clip_range, s.secagg_max_weight = float(s.secagg_clip_range), float(s.secagg_max_weight)
        if s.secure_aggregation and (s.min_sites < 2 or s.secagg_clip_range <= 0 or s.secagg_max_weight < 1):
            raise ValueError(f"secure aggregation needs min-sites >= 2 (a sum of one site is that site's update), "
                             f"secagg-clip-range > 0 and secagg-max-weight >= 1; got {s.min_sites}, "
                             f"{s.secagg_clip_range}, {s.secagg_max_weight}")
        if not str(s.federation_name).startswith("Dataset"):
            raise ValueError(f"federation-name {s.federation_name!r} must start with 'Dataset' "
                             f"(nnUNetv2_predict -d finds it so)")
        return s

    def to_run_config(self) -> dict:
        out = {}
        for key, attr in KEYS.items():
            value = getattr(self, attr)
            out[key] = json.dumps(value, sort_keys=True) if attr in _JSON_KEYS else value
        return out

    def fold_value(self):
        return self.fold if self.fold == "all" else int(self.fold)

    def resume_key(self) -> dict:
        """What must not change between an interrupted run and its resumption."""
        return {"configuration": self.configuration, "trainer": self.trainer, "local_steps": self.local_steps,
                "rounds": self.rounds, "fold": str(self.fold), "plans": self.plans, "fedprox_mu": self.fedprox_mu,
                "trainer_options": {k: self.trainer_options[k] for k in sorted(self.trainer_options)},
                **({"strategy": self.strategy, "strategy_options": dict(sorted(self.strategy_options.items()))}
                   if self.strategy != "fedavg" or self.strategy_options else {})}

    def as_dict(self) -> dict:
        return asdict(self)
