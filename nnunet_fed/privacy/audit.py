"""Empirical privacy audit with canary cases: an epsilon lower bound from one training run.

Method (Steinke, Nasr and Jagielski 2023, "Privacy auditing with one (1) training run"):

1. make ``m`` canary cases at one site. A canary is a copy of one of the site's cases with a random block
   pattern stamped into the image and, in the stamp's box, a label drawn at random: image and label are
   unrelated, so a model predicts a canary's stamp label only if it memorised that canary;
2. include each canary in the site's training data independently with probability 1/2. The site's data and
   its canaries are written as a new nnU-Net dataset (``Dataset<ID>_<site>Audit``), preprocessed by nnU-Net
   with the site's own plans; the excluded canaries are preprocessed the same way and kept aside;
3. train with the chosen trainer (``nnunet_fed simulate``: the audited site plus any other sites);
4. score every canary by the released (global) model's log-odds of the stamp's label against the labels it
   was drawn from, on the stamp (nnU-Net's predictor, sliding window on the preprocessed case, no test-time
   mirroring); high = "member";
5. guess the ``k`` highest-scoring canaries as members and the ``k`` highest as non-members, count the correct
   guesses ``v`` of ``r = 2k``, and report the largest epsilon for which ``v`` or more correct guesses would
   have probability below 1 - confidence under (epsilon, delta)-DP (the paper's Theorem 3 / Algorithm 2).

A correct DP implementation never shows a lower bound above its accounted epsilon (except with probability
1 - confidence); a non-private run that memorises shows a bound well above 0. With ``m`` canaries the bound
cannot exceed what ``m`` perfect guesses give (about 2.3 for m = 32, 3.0 for m = 64 at 95 %).
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np

CANARY_PREFIX = "canary_"
NONMEMBER_FOLDER = "audit_nonmembers"
REPORT_FILE = "audit_report.json"


# ---------------------------------------------------------------------- the bound
def p_value_dp(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ``v`` or more correct guesses out of ``r`` (``m`` canaries, each included with probability
    1/2) under (epsilon, delta)-DP (Steinke et al. 2023, Theorem 3 and Algorithm 2)."""
    from scipy import stats

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += float(stats.binom.pmf(v - i, r, q))  # P[v > Binomial(r, q) >= v - i]
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` refute at the given confidence (0 if none)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    p = 1.0 - confidence
    if r == 0 or p_value_dp(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_dp(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return float("inf")
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value_dp(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores, members, num_guesses: int | None = None) -> tuple[int, int]:
    """(guesses r, correct v): the ``r/2`` highest scores guessed members, the ``r/2`` lowest non-members.
    ``num_guesses`` defaults to every canary (an odd count leaves the middle one out)."""
    scores, members = np.asarray(scores, float), np.asarray(members, bool)
    m = len(scores)
    k = (m if num_guesses is None else int(num_guesses)) // 2
    if not 0 <= 2 * k <= m:
        raise ValueError(f"cannot make {num_guesses} guesses on {m} canaries")
    order = np.argsort(-scores, kind="stable")
    correct = int(members[order[:k]].sum()) + int((~members[order[m - k:]]).sum()) if k else 0
    return 2 * k, correct


# ---------------------------------------------------------------------- canaries as an nnU-Net dataset
def stamp_pattern(shape: tuple, rng: np.random.Generator, blocks: int = 3) -> tuple[tuple, np.ndarray]:
    """A random +-1 block pattern (``blocks`` per axis) and where it goes: a box of about a third of each
    spatial axis (axes of size 1, as in 2D images, stay 1), at a random position."""
    size = [1 if n == 1 else max(blocks, n // 3) for n in shape]
    start = [0 if n == 1 else int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
    coarse = rng.choice([-1.0, 1.0], size=[1 if n == 1 else blocks for n in shape])
    pattern = coarse
    for ax, (n, s) in enumerate(zip(shape, size)):
        if n != 1:
            idx = np.minimum(np.arange(s) * blocks // s, blocks - 1)
            pattern = np.take(pattern, idx, axis=ax)
    box = tuple(slice(a, a + s) for a, s in zip(start, size))
    return box, pattern


def write_canary(image_files: list[str], label_file: str, image_out: str, label_out: str, ending: str,
                 labels: list[int], rng: np.random.Generator) -> tuple[int, list[int]]:
    """A canary: a copy of one case with a random block pattern stamped into every channel (mean +- 3 std of
    that channel) and labelled, in the stamp's box only, with a label drawn at random (among the foreground
    labels; with one foreground label, foreground or background). Image and label are unrelated, so a model
    predicts the stamp's label only if it memorised this case. Returns the stamp's label and the labels it
    was drawn from."""
    import SimpleITK as sitk

    try:
        seg_img = sitk.ReadImage(label_file)
    except RuntimeError as e:
        raise ValueError(f"the canary audit reads and writes cases with SimpleITK; {label_file}: {e}") from None
    seg = sitk.GetArrayFromImage(seg_img)
    box, pattern = stamp_pattern(seg.shape, rng)
    fg = [v for v in labels if v != 0]
    choice = fg if len(fg) > 1 else [0] + fg
    value = int(rng.choice(choice))
    seg = seg.copy()
    seg[box] = value
    out = sitk.GetImageFromArray(seg.astype(np.uint8))
    out.CopyInformation(seg_img)
    sitk.WriteImage(out, label_out + ending, True)
    for c, f in enumerate(image_files):
        img = sitk.ReadImage(f)
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        mean, std = float(arr.mean()), float(arr.std()) or 1.0
        arr[box] = mean + 3.0 * std * pattern
        new = sitk.GetImageFromArray(arr)
        new.CopyInformation(img)
        sitk.WriteImage(new, f"{image_out}_{c:04d}{ending}", True)
    return value, [int(x) for x in choice]


@dataclass
class AuditConfig:
    site: str  # dataset ID or name of the site that receives the canaries
    configuration: str
    trainer: str = "nnUNetTrainerFedAvg"
    other_sites: list = field(default_factory=list)
    num_canaries: int = 32
    rounds: int = 5
    local_steps: int = 50
    val_steps: int = 1
    fold: int | str = 0
    plans_identifier: str = "nnUNetPlans"
    device: str = "cuda"
    trainer_options: dict = field(default_factory=dict)
    audit_id: int | None = None  # dataset ID of the site's audit copy (default: the highest free ID)
    seed: int = 0
    confidence: float = 0.95
    num_guesses: int | None = None  # default: guess every canary
    delta: float = 1e-5  # for the bound when the run reports no delta (non-private)
    progress: bool = True
    num_processes: int = 2


def _free_dataset_id() -> int:
    used = set()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        for d in glob.glob(os.path.join(os.environ[var], "Dataset*_*")):
            try:
                used.add(int(os.path.basename(d)[7:10]))
            except ValueError:
                pass
    for i in range(999, 0, -1):
        if i not in used:
            return i
    raise RuntimeError("no free dataset ID left (1-999)")


def make_audit_dataset(cfg: AuditConfig, site_name: str) -> dict:
    """Write the site's data plus its canaries as a new raw dataset, preprocess it with the site's plans, and
    move the excluded canaries out of the training data. Returns the dataset name and the canary table."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_fed.sites import read_json

    raw_site = os.path.join(os.environ["nnUNet_raw"], site_name)
    pre_site = os.path.join(os.environ["nnUNet_preprocessed"], site_name)
    dj = read_json(os.path.join(raw_site, "dataset.json"), f"site {site_name}: dataset.json")
    if "regions_class_order" in dj:
        raise ValueError(f"site {site_name}: region-based labels are not supported by the canary audit")
    plans_file = os.path.join(pre_site, cfg.plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise ValueError(f"site {site_name}: no plans {plans_file}; plan and preprocess the site first")
    plans = read_json(plans_file, f"site {site_name}: plans")
    if cfg.configuration not in plans["configurations"]:
        raise ValueError(f"site {site_name}: configuration {cfg.configuration!r} not in {plans_file}")
    cases = get_filenames_of_train_images_and_targets(raw_site, dj)
    real = sorted(cases)
    if not real:
        raise ValueError(f"site {site_name}: no training cases in {raw_site}")

    audit_id = cfg.audit_id if cfg.audit_id is not None else _free_dataset_id()
    name = f"Dataset{audit_id:03d}_{site_name.split('_', 1)[1]}Audit"
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        clash = [d for d in glob.glob(os.path.join(os.environ[var], f"Dataset{audit_id:03d}_*"))
                 if os.path.basename(d) != name]
        if clash:
            raise ValueError(f"dataset ID {audit_id} is taken by {clash[0]}; choose another --audit-id")
    raw, pre = os.path.join(os.environ["nnUNet_raw"], name), os.path.join(os.environ["nnUNet_preprocessed"], name)
    for d in (raw, pre):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(raw, "imagesTr"))
    os.makedirs(os.path.join(raw, "labelsTr"))
    ending = dj["file_ending"]
    for key in real:  # the site's own cases, linked, not copied
        for c, f in enumerate(cases[key]["images"]):
            os.symlink(os.path.abspath(f), os.path.join(raw, "imagesTr", f"{key}_{c:04d}{ending}"))
        os.symlink(os.path.abspath(cases[key]["label"]), os.path.join(raw, "labelsTr", key + ending))

    rng = np.random.default_rng(cfg.seed)
    m = int(cfg.num_canaries)
    members = rng.random(m) < 0.5  # each canary included independently with probability 1/2
    sources = rng.choice(len(real), size=m, replace=m > len(real))
    labels = sorted({int(v) for k, v in dj["labels"].items() if k != "ignore"})
    table = []
    for i in range(m):
        cid, src = f"{CANARY_PREFIX}{i:04d}", real[int(sources[i])]
        value, choices = write_canary(cases[src]["images"], cases[src]["label"], os.path.join(raw, "imagesTr", cid),
                                      os.path.join(raw, "labelsTr", cid), ending, labels, rng)
        table.append({"id": cid, "source": src, "member": bool(members[i]), "stamp_label": value,
                      "choices": choices})
    dj_audit = {k: v for k, v in dj.items() if k != "dataset"}
    dj_audit["numTraining"] = len(real) + m
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump(dj_audit, f, indent=2)

    os.makedirs(pre)
    plans = dict(plans, dataset_name=name)
    with open(os.path.join(pre, cfg.plans_identifier + ".json"), "w") as f:
        json.dump(plans, f, indent=2)
    shutil.copyfile(os.path.join(raw, "dataset.json"), os.path.join(pre, "dataset.json"))
    if os.path.isfile(os.path.join(pre_site, "dataset_fingerprint.json")):
        shutil.copyfile(os.path.join(pre_site, "dataset_fingerprint.json"), os.path.join(pre, "dataset_fingerprint.json"))
    site_splits = os.path.join(pre_site, "splits_final.json")
    splits = read_json(site_splits, "splits") if os.path.isfile(site_splits) else generate_crossval_split(real, 12345, 5)
    member_ids = [t["id"] for t in table if t["member"]]
    splits = [{"train": list(s["train"]) + member_ids, "val": list(s["val"])} for s in splits]
    with open(os.path.join(pre, "splits_final.json"), "w") as f:
        json.dump(splits, f, indent=2)

    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    with contextlib.redirect_stdout(io.StringIO()):
        preprocess_dataset(audit_id, cfg.plans_identifier, (cfg.configuration,), [cfg.num_processes],
                           verbose=False, show_progress_bar=False)
    data_folder = os.path.join(pre, PlansManager(plans).get_configuration(cfg.configuration).data_identifier)
    aside = os.path.join(pre, f"{NONMEMBER_FOLDER}_{cfg.configuration}")
    os.makedirs(aside, exist_ok=True)
    for t in table:
        if not t["member"]:  # never seen by training, scored like the members
            for f in glob.glob(os.path.join(data_folder, t["id"] + "[._]*")):
                shutil.move(f, aside)
    return {"name": name, "id": audit_id, "canaries": table, "data_folder": data_folder, "nonmember_folder": aside}


# ---------------------------------------------------------------------- scoring
def score_canaries(model_folder: str, fold, canaries: list[dict], data_folder: str, nonmember_folder: str,
                   device: str = "cpu") -> list[float]:
    """Membership score of each canary: the model's mean log-odds of the stamp's label against the other labels
    it was drawn from, over the stamp (nnU-Net's predictor on the preprocessed case)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_fed.sites import ensure_trainer_path

    ensure_trainer_path()
    dev = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.initialize_from_trained_model_folder(model_folder, use_folds=(fold,),
                                                       checkpoint_name="checkpoint_final.pth")
    scores = []
    for t in canaries:
        folder = data_folder if t["member"] else nonmember_folder
        ds = infer_dataset_class(folder)(folder, identifiers=[t["id"]])
        data, seg, _, _ = ds.load_case(t["id"])
        data = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
        seg = torch.from_numpy(np.asarray(seg[:], dtype=np.int64))
        with torch.no_grad():
            try:
                logits = predictor.predict_logits_from_preprocessed_data(data).float()
            except RuntimeError as e:
                if "inf" not in str(e):
                    raise
                # a diverged model (e.g. heavy client-level noise): no score. NaN ranks last for every canary
                # alike, and canaries are in random membership order, so the guesses carry no information
                scores.append(float("nan"))
                continue
        logp = torch.log_softmax(logits, 0)
        # the stamp: where the canary's label differs from its source case (same preprocessing, same grid)
        src = infer_dataset_class(data_folder)(data_folder, identifiers=[t["source"]]).load_case(t["source"])[1]
        src = torch.from_numpy(np.asarray(src[:], dtype=np.int64))
        region = (src != seg)[0] if src.shape == seg.shape else None
        if region is None or not region.any():  # cannot locate the stamp: minus the whole case's cross-entropy
            ce = torch.nn.functional.cross_entropy(logits[None], seg, ignore_index=-1)
            scores.append(-float(ce))
            continue
        # log-odds of the stamp's label against the other labels it could have had: the model's general
        # preference among them does not depend on membership and cancels out
        others = [c for c in t["choices"] if c != t["stamp_label"]]
        odds = logp[t["stamp_label"]] - torch.logsumexp(logp[others], 0)
        scores.append(float(odds[region].mean()))
    return scores


# ---------------------------------------------------------------------- accounted epsilon
def accounted_privacy(site_fold: str, global_fold: str, site_name: str) -> dict:
    """(epsilon, delta) the run accounted for a case of the audited site: the smallest of the site's
    sample-level report (``privacy_report.json`` in the site's fold folder, else the last round's ``epsilon``
    in the federation metrics) and the server's client-level epsilon (a case is part of its site, so
    client-level DP bounds it too). ``epsilon`` is None for a run without DP."""
    found = []
    report = os.path.join(site_fold, "privacy_report.json")
    if os.path.isfile(report):
        with open(report) as f:
            rep = json.load(f)
        if rep.get("epsilon") is not None:
            found.append(("sample-level (privacy_report.json)", float(rep["epsilon"]), rep.get("delta")))
    rows = []
    metrics = os.path.join(global_fold, "federation_metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if rows and not found:
        site = rows[-1].get("sites", {}).get(site_name, {})
        if site.get("epsilon") is not None:
            found.append(("sample-level (round metrics)", float(site["epsilon"]), site.get("delta")))
    if rows and rows[-1].get("client_dp", {}).get("epsilon") is not None:
        dp = rows[-1]["client_dp"]
        found.append(("client-level (round metrics)", float(dp["epsilon"]), dp.get("delta")))
    if not found:
        return {"epsilon": None, "delta": None, "source": "no differential privacy"}
    source, eps, delta = min(found, key=lambda x: x[1])
    return {"epsilon": eps, "delta": None if delta is None else float(delta), "source": source}


# ---------------------------------------------------------------------- the audit
def run_audit(cfg: AuditConfig, output: str | None = None) -> dict:
    """Canaries, training, scoring and the bound; returns (and writes) the audit report."""
    from nnunet_fed import sites as site_checks
    from nnunet_fed.federation.simulation import SimulationConfig, global_model_folder, simulate

    site_checks.require_nnunet_paths()
    if cfg.num_canaries < 2:
        raise ValueError(f"--canaries must be >= 2, got {cfg.num_canaries}")
    if cfg.num_guesses is not None and not 0 < cfg.num_guesses <= cfg.num_canaries:
        raise ValueError(f"--guesses must lie in 1..{cfg.num_canaries}, got {cfg.num_guesses}")
    if not 0 < cfg.confidence < 1:
        raise ValueError(f"--confidence must lie in (0, 1), got {cfg.confidence}")
    site_name = site_checks.dataset_name(cfg.site)
    others = [site_checks.dataset_name(s) for s in cfg.other_sites]
    trainer_cls = site_checks.find_trainer(cfg.trainer)
    trainer_cls.resolve_options(cfg.trainer_options)  # bad options fail before anything is written

    ds = make_audit_dataset(cfg, site_name)
    sim = SimulationConfig(dataset_ids=[ds["name"]] + others, configuration=cfg.configuration, trainer=cfg.trainer,
                           rounds=cfg.rounds, local_steps=cfg.local_steps, val_steps=cfg.val_steps, fold=cfg.fold,
                           plans_identifier=cfg.plans_identifier, device=cfg.device,
                           federation_name=f"Dataset{ds['id']:03d}Audit_federation", seed=cfg.seed + 12345,
                           final_validation=False, fresh=True, progress=cfg.progress,
                           trainer_options=dict(cfg.trainer_options))
    out = simulate(sim)
    model = out["global_model_folder"]
    fold_dir = os.path.join(model, f"fold_{cfg.fold}")
    scores = score_canaries(model, cfg.fold, ds["canaries"], ds["data_folder"], ds["nonmember_folder"], cfg.device)
    members = [t["member"] for t in ds["canaries"]]
    r, v = guesses_from_scores(scores, members, cfg.num_guesses)
    privacy = accounted_privacy(out["site_folders"][ds["name"]], fold_dir, ds["name"])
    delta = privacy["delta"] if privacy["delta"] is not None else cfg.delta
    bound = epsilon_lower_bound(len(members), r, v, delta, cfg.confidence)
    member_scores = [s for s, mm in zip(scores, members) if mm]
    other_scores = [s for s, mm in zip(scores, members) if not mm]
    report = {
        "site": site_name, "audit_dataset": ds["name"], "trainer": cfg.trainer, "configuration": cfg.configuration,
        "trainer_options": dict(cfg.trainer_options), "rounds": cfg.rounds, "local_steps": cfg.local_steps,
        "canaries": len(members), "members": int(sum(members)), "guesses": r, "correct": v,
        "confidence": cfg.confidence, "delta": delta,
        "epsilon_lower_bound": bound,
        "accounted_epsilon": privacy["epsilon"], "accounted_source": privacy["source"],
        "consistent": privacy["epsilon"] is None or bound <= privacy["epsilon"],
        "mean_member_score": float(np.mean(member_scores)) if member_scores else None,
        "mean_nonmember_score": float(np.mean(other_scores)) if other_scores else None,
        "model": model,
        "canary_table": [dict(t, score=s) for t, s in zip(ds["canaries"], scores)],
        "config": asdict(cfg),
    }
    output = output or os.path.join(fold_dir, REPORT_FILE)
    with open(output, "w") as f:
        json.dump(report, f, indent=2, default=str)
    report["report_file"] = output
    return report


def format_report(rep: dict) -> str:
    acc = rep["accounted_epsilon"]
    lines = [
        f"privacy audit of {rep['trainer']} at site {rep['site']} ({rep['canaries']} canaries, "
        f"{rep['members']} trained on)",
        f"  membership guesses: {rep['correct']} of {rep['guesses']} correct "
        f"(mean score members {rep['mean_member_score']:.3f}, non-members {rep['mean_nonmember_score']:.3f})",
        f"  empirical epsilon lower bound ({rep['confidence']:.0%} confidence, delta {rep['delta']:g}): "
        f"{rep['epsilon_lower_bound']:.3f}",
        f"  accounted epsilon: {'none (no differential privacy)' if acc is None else f'{acc:.3f}'}"
        f"{'' if acc is None else ' (' + rep['accounted_source'] + ')'}",
    ]
    if not rep["consistent"]:
        lines.append("  WARNING: the lower bound exceeds the accounted epsilon: the privacy accounting or the "
                     "mechanism is wrong (or a 1 - confidence chance event happened)")
    lines.append(f"  report: {rep.get('report_file')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line
def add_audit_command(sub) -> None:
    """``nnunet_fed audit``: registered by nnunet_fed.cli."""
    p = sub.add_parser("audit", help="empirical privacy audit: canary cases, membership guesses, epsilon lower bound")
    p.add_argument("-d", "--datasets", nargs="+", required=True,
                   help="dataset IDs or names; the first site receives the canaries, the others train alongside")
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerFedAvg")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("--canaries", type=int, default=64, help="number of canary cases (each trained on with prob. 1/2)")
    p.add_argument("--guesses", type=int, default=None, help="membership guesses (default: every canary)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=50)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--delta", type=float, default=1e-5, help="delta of the bound when the run accounts none")
    p.add_argument("--audit-id", type=int, default=None, help="dataset ID of the site's audit copy (default: free ID)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--option", action="append", default=[], metavar="NAME=VALUE", help="trainer option")
    p.add_argument("--output", default=None, help="report file (default: audit_report.json in the model's fold)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args) -> int:
    from nnunet_fed.cli import parse_options

    cfg = AuditConfig(site=args.datasets[0], other_sites=list(args.datasets[1:]), configuration=args.configuration,
                      trainer=args.trainer, plans_identifier=args.plans,
                      fold=args.fold if args.fold == "all" else int(args.fold), num_canaries=args.canaries,
                      num_guesses=args.guesses, rounds=args.rounds, local_steps=args.local_steps, device=args.device,
                      confidence=args.confidence, delta=args.delta, audit_id=args.audit_id, seed=args.seed,
                      trainer_options=parse_options(args.option), progress=not args.no_progress)
    print(format_report(run_audit(cfg, args.output)))
    return 0
