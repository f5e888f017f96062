"""Empirical privacy audit with canary cases: an epsilon lower bound from one training run.

Method (Steinke, Nasr and Jagielski 2023, "Privacy auditing with one (1) training run"):

1. make ``m`` canary cases at one site. A canary is a copy of one of the site's cases whose image is
   overwritten, in a box (``STAMP_FRACTION`` of each axis: the whole image by default), by a random +-1 block
   pattern (``PATTERN_BLOCKS`` blocks per axis) and whose labels there are a random label map
   (``LABEL_BLOCKS`` cells per axis, each cell one of the labels the stamp may have, every such label in as
   many cells, shuffled): image and labels are unrelated, so a model predicts a canary's label map only if it
   memorised that canary;
2. once every canary exists, include each independently with probability 1/2 in the site's training data. The
   site's data and its canaries are written as a new nnU-Net dataset (``Dataset<ID>_<site>Audit``),
   preprocessed by nnU-Net with the site's own plans; the excluded canaries are preprocessed the same way and
   kept aside;
3. train with the chosen trainer (``nnunet_fed simulate``: the audited site plus any other sites);
4. score every canary with the released (global) model (nnU-Net's predictor, sliding window on the
   preprocessed case, no test-time mirroring): the log-odds of each stamp voxel's label against the other
   labels it could have had, averaged over the voxels of each label, then over the labels (``stamp_score``:
   a preference for one label over the whole stamp cancels out); high = "member";
5. guess the ``k`` highest-scoring canaries as members and the ``k`` lowest as non-members, count the correct
   guesses ``v`` of ``r = 2k``, and report the largest epsilon for which ``v`` or more correct guesses would
   have probability below 1 - confidence under (epsilon, delta)-DP (the paper's Theorem 3 / Algorithm 2).

The comparison with the accounted epsilon is a statistical test (:func:`check_accounting`): for a correct DP
implementation the bound exceeds its accounted epsilon with probability at most 1 - confidence (a false alarm),
and the report gives the p-value of the observed guesses under the accounted (epsilon, delta). A bound below the
accounted epsilon does not prove the accounting right: with ``m`` canaries the bound cannot exceed what ``m``
perfect guesses give (about 2.3 for m = 32, 3.0 for m = 64 at 95 %). A non-private run that memorises shows a
bound well above 0.

The accounted epsilon is the one for a training case of the audited site, the unit the canaries test. Under
client-level DP that is not the site's epsilon: see :func:`nnunet_fed.privacy.client_level.case_level_epsilon`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nnunet_fed.federation.simulation import SimulationConfig

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
#: the stamp covers this fraction of each spatial axis (axes of size 1, as in 2D images, stay 1)
STAMP_FRACTION = 1.0
#: +-1 blocks of the stamp's image pattern, per spatial axis
PATTERN_BLOCKS = 8
#: cells of the stamp's label map, per spatial axis (each cell spans PATTERN_BLOCKS / LABEL_BLOCKS blocks)
LABEL_BLOCKS = 4


def _block_index(size: int, blocks: int) -> np.ndarray:
    return np.minimum(np.arange(size) * blocks // size, blocks - 1)


def upsample_blocks(coarse: np.ndarray, shape) -> np.ndarray:
    """``coarse`` (one entry per block) repeated into an array of ``shape`` (blocks as even as the size allows)."""
    out = np.asarray(coarse)
    for ax, n in enumerate(shape):
        out = np.take(out, _block_index(n, out.shape[ax]), axis=ax)
    return out


def stamp_pattern(shape: tuple, rng: np.random.Generator, blocks: int | None = None,
                  fraction: float | None = None) -> tuple[tuple, np.ndarray]:
    """A random +-1 block pattern (``blocks`` per axis, default ``PATTERN_BLOCKS``) and where it goes: a box of
    ``fraction`` (default ``STAMP_FRACTION``) of each spatial axis (axes of size 1 stay 1), at a random position."""
    blocks = PATTERN_BLOCKS if blocks is None else int(blocks)
    fraction = STAMP_FRACTION if fraction is None else float(fraction)
    size = [1 if n == 1 else min(n, max(blocks, int(round(n * fraction)))) for n in shape]
    start = [0 if n == 1 else int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
    coarse = rng.choice([-1.0, 1.0], size=[1 if n == 1 else blocks for n in shape])
    box = tuple(slice(a, a + s) for a, s in zip(start, size))
    return box, upsample_blocks(coarse, size)


def stamp_label_map(size, choices, rng: np.random.Generator, blocks: int | None = None) -> np.ndarray:
    """The stamp's labels: a grid of ``blocks`` cells per axis (default ``LABEL_BLOCKS``; axes of size 1 stay
    1), each cell one label of ``choices``, balanced (every choice in as many cells as the count allows) and
    shuffled. Drawn independently of the image, so no model can predict it without having memorised it."""
    blocks = LABEL_BLOCKS if blocks is None else int(blocks)
    grid = [1 if n == 1 else min(blocks, n) for n in size]
    cells = int(np.prod(grid))
    balanced = np.resize(rng.permutation(np.asarray(choices)), cells)  # each choice cells/len(choices) times
    return rng.permutation(balanced).reshape(grid)


def write_canary(image_files: list[str], label_file: str, image_out: str, label_out: str, ending: str,
                 labels: list[int], rng: np.random.Generator) -> dict:
    """A canary: a copy of one case with a random +-1 block pattern stamped into every channel (mean +- 3 std
    of that channel) and, in the stamp, a random label map (``stamp_label_map``; among the foreground labels,
    or foreground and background with one foreground label). Image and label are unrelated, so a model
    predicts the stamp's labels only if it memorised this case. Returns the stamp's box (``[start, stop]`` per
    axis of the SimpleITK array), its coarse label map and the labels it was drawn from."""
    import SimpleITK as sitk

    try:
        seg_img = sitk.ReadImage(label_file)
    except RuntimeError as e:
        raise ValueError(f"the canary audit reads and writes cases with SimpleITK; {label_file}: {e}") from None
    seg = sitk.GetArrayFromImage(seg_img)
    box, pattern = stamp_pattern(seg.shape, rng)
    fg = [v for v in labels if v != 0]
    choices = fg if len(fg) > 1 else [0] + fg
    size = pattern.shape
    label_map = stamp_label_map(size, choices, rng)
    seg = seg.copy()
    seg[box] = upsample_blocks(label_map, size)
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
    return {"box": [[b.start, b.stop] for b in box], "label_map": label_map.tolist(),
            "choices": [int(x) for x in choices]}


@dataclass
class AuditConfig:
    """The audit's own settings, and the federated training it audits.

    ``training`` is the simulation as it would run without an audit: its first site receives the canaries (the
    simulation then runs on that site's audit copy), the other sites train alongside. Its ``federation_name``,
    ``seed``, ``fresh`` and ``final_validation`` are set by the audit."""
    training: SimulationConfig
    num_canaries: int = 32
    audit_id: int | None = None  # dataset ID of the site's audit copy (default: the highest free ID)
    seed: int = 0  # canaries and their membership
    confidence: float = 0.95
    num_guesses: int | None = None  # default: guess every canary
    delta: float = 1e-5  # for the bound when the run reports no delta (non-private)
    num_processes: int = 2  # preprocessing of the audit copy

    @property
    def site(self) -> str:
        return str(self.training.dataset_ids[0])

    @property
    def other_sites(self) -> list:
        return [str(s) for s in self.training.dataset_ids[1:]]


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
    plans_file = os.path.join(pre_site, cfg.training.plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise ValueError(f"site {site_name}: no plans {plans_file}; plan and preprocess the site first")
    plans = read_json(plans_file, f"site {site_name}: plans")
    if cfg.training.configuration not in plans["configurations"]:
        raise ValueError(f"site {site_name}: configuration {cfg.training.configuration!r} not in {plans_file}")
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
    sources = rng.choice(len(real), size=m, replace=m > len(real))
    labels = sorted({int(v) for k, v in dj["labels"].items() if k != "ignore"})
    table = []
    for i in range(m):
        cid, src = f"{CANARY_PREFIX}{i:04d}", real[int(sources[i])]
        stamp = write_canary(cases[src]["images"], cases[src]["label"], os.path.join(raw, "imagesTr", cid),
                             os.path.join(raw, "labelsTr", cid), ending, labels, rng)
        table.append({"id": cid, "source": src, **stamp})
    # membership, drawn once every canary exists: each canary included independently with probability 1/2
    members = np.random.default_rng([int(cfg.seed), 1]).random(m) < 0.5
    for t, member in zip(table, members):
        t["member"] = bool(member)
    dj_audit = {k: v for k, v in dj.items() if k != "dataset"}
    dj_audit["numTraining"] = len(real) + m
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump(dj_audit, f, indent=2)

    os.makedirs(pre)
    plans = dict(plans, dataset_name=name)
    with open(os.path.join(pre, cfg.training.plans_identifier + ".json"), "w") as f:
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
        preprocess_dataset(audit_id, cfg.training.plans_identifier, (cfg.training.configuration,), [cfg.num_processes],
                           verbose=False, show_progress_bar=False)
    data_folder = os.path.join(pre, PlansManager(plans).get_configuration(cfg.training.configuration).data_identifier)
    aside = os.path.join(pre, f"{NONMEMBER_FOLDER}_{cfg.training.configuration}")
    os.makedirs(aside, exist_ok=True)
    for t in table:
        if not t["member"]:  # never seen by training, scored like the members
            for f in glob.glob(os.path.join(data_folder, t["id"] + "[._]*")):
                shutil.move(f, aside)
    return {"name": name, "id": audit_id, "canaries": table, "data_folder": data_folder, "nonmember_folder": aside}


# ---------------------------------------------------------------------- scoring
def stamp_region(seg, source_seg):
    """The stamp in a preprocessed canary: the bounding box of where its labels differ from its source case's
    (same preprocessing, same grid), as a tuple of slices over the spatial axes; None if it cannot be found."""
    seg, source_seg = np.asarray(seg), np.asarray(source_seg)
    if seg.shape != source_seg.shape:
        return None
    where = np.nonzero(seg != source_seg)
    if not len(where[0]):
        return None
    return tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)


def stamp_score(logits, seg, region, choices) -> float:
    """Membership score of one canary: the model's log-odds of each stamp voxel's label against the other
    labels it could have had, averaged over the voxels of each label, then over the labels.

    ``logits`` (classes, *spatial), ``seg`` (*spatial) the canary's labels, ``region`` the stamp's slices.
    Averaging per label first makes a preference that does not follow the canary's label map (the model
    favouring one label over the whole stamp, as a model that never saw the canary may) cancel out: it raises
    one label's mean log-odds by what it lowers the other's (exactly so with two labels). What remains is how
    closely the prediction follows this canary's random label map, which only memorising it explains."""
    import torch

    logits = torch.as_tensor(logits).float()
    logp = torch.log_softmax(logits, 0)[(slice(None),) + tuple(region)]
    labels = torch.as_tensor(np.asarray(seg)[tuple(region)])
    per_label = []
    for c in choices:
        where = labels == c
        if where.any():
            others = [o for o in choices if o != c]
            odds = logp[c] - torch.logsumexp(logp[others], 0)
            per_label.append(float(odds[where].mean()))
    return float(np.mean(per_label)) if per_label else float("nan")


def score_canaries(model_folder: str, fold, canaries: list[dict], data_folder: str, nonmember_folder: str,
                   device: str = "cpu") -> list[float]:
    """Membership score of every canary (``stamp_score``) from the released model's prediction of the
    preprocessed case (nnU-Net's predictor, sliding window, no test-time mirroring). A function of the model
    and the canary only: members and non-members are scored alike."""
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
        folder = data_folder if t["member"] else nonmember_folder  # where the file is; the same preprocessing
        ds = infer_dataset_class(folder)(folder, identifiers=[t["id"]])
        data, seg, _, _ = ds.load_case(t["id"])
        data = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
        seg = np.asarray(seg[:], dtype=np.int64)[0]
        with torch.no_grad():
            try:
                logits = predictor.predict_logits_from_preprocessed_data(data).float().cpu()
            except RuntimeError as e:
                if "inf" not in str(e):
                    raise
                # a diverged model (e.g. heavy client-level noise): no score. NaN ranks last for every canary
                # alike, and canaries are in random membership order, so the guesses carry no information
                scores.append(float("nan"))
                continue
        src = infer_dataset_class(data_folder)(data_folder, identifiers=[t["source"]]).load_case(t["source"])[1]
        region = stamp_region(seg, np.asarray(src[:], dtype=np.int64)[0])
        if region is None:  # cannot locate the stamp: minus the whole case's cross-entropy
            ce = torch.nn.functional.cross_entropy(logits[None], torch.from_numpy(seg)[None], ignore_index=-1)
            scores.append(-float(ce))
            continue
        scores.append(stamp_score(logits, seg, region, t["choices"]))
    return scores


# ---------------------------------------------------------------------- accounted epsilon
#: ``source`` of the accounted epsilon when it comes from client-level DP (a case's bound, not a site's)
CLIENT_LEVEL_CASE_SOURCE = "client-level, case-level bound (sensitivity 2C)"


def accounted_privacy(site_fold: str, global_fold: str, site_name: str) -> dict:
    """(epsilon, delta) the run accounted for one training case of the audited site.

    The smallest of the site's sample-level epsilon (``privacy_report.json`` in ``site_fold``, else the last
    round's ``epsilon`` of ``site_name`` in ``global_fold``'s federation_metrics.jsonl) and the case-level bound
    of the server's client-level DP. The latter is recomputed from the last round's ``client_dp`` record
    (``noise_multiplier``, ``sample_rate``, ``rounds_accounted``, ``delta``) with
    :func:`~nnunet_fed.privacy.client_level.case_level_epsilon`: a case moves its site's clipped update by up to
    2C and flips its unclipped bit, so it is protected as by multiplier z / 2, not z (the recorded ``epsilon``
    is a site's, kept as ``site_epsilon``).

    Returns ``{"epsilon", "delta", "source", "site_epsilon"}``; ``epsilon`` and ``delta`` are None for a run
    without DP, ``site_epsilon`` is None without client-level DP. Raises ValueError when a ``client_dp`` record
    lacks the fields above."""
    from nnunet_fed.privacy.client_level import case_level_epsilon

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
    site_epsilon = None
    if rows and rows[-1].get("client_dp", {}).get("epsilon") is not None:
        dp = rows[-1]["client_dp"]
        missing = [k for k in ("noise_multiplier", "sample_rate", "rounds_accounted", "delta") if dp.get(k) is None]
        if missing:
            raise ValueError(f"{metrics}: the last round's client_dp record has no {', '.join(missing)}; the "
                             f"epsilon of one case cannot be computed")
        site_epsilon = float(dp["epsilon"])
        found.append((CLIENT_LEVEL_CASE_SOURCE, case_level_epsilon(float(dp["noise_multiplier"]),
                                                                   float(dp["sample_rate"]),
                                                                   int(dp["rounds_accounted"]), float(dp["delta"])),
                      dp["delta"]))
    if not found:
        return {"epsilon": None, "delta": None, "source": "no differential privacy", "site_epsilon": None}
    source, eps, delta = min(found, key=lambda x: x[1])
    return {"epsilon": eps, "delta": None if delta is None else float(delta), "source": source,
            "site_epsilon": site_epsilon}


def check_accounting(m: int, r: int, v: int, privacy: dict, confidence: float = 0.95, delta: float = 1e-5) -> dict:
    """The audit's verdict on the accounted privacy: ``v`` correct guesses out of ``r`` on ``m`` canaries against
    ``privacy`` (what :func:`accounted_privacy` returns; ``delta`` is used when it has none).

    Returns ``delta`` (the one used), ``epsilon_lower_bound`` (at ``confidence``), ``accounted_epsilon``,
    ``accounted_source``, ``site_epsilon``, ``consistent`` (bound <= accounted epsilon, or no DP),
    ``p_value`` (probability of ``v`` or more correct guesses under the accounted (epsilon, delta), by
    :func:`p_value_dp`; None without DP; below 1 - confidence exactly when the bound exceeds the accounted
    epsilon), ``false_alarm_probability`` (1 - confidence: the most often a correct mechanism shows a bound
    above its accounted epsilon, Steinke et al. 2023, Theorem 3) and ``largest_possible_bound`` (what ``r``
    correct guesses would give: no accounted epsilon above it can be refuted by this audit)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    delta = privacy["delta"] if privacy.get("delta") is not None else float(delta)
    bound = epsilon_lower_bound(m, r, v, delta, confidence)
    eps = privacy.get("epsilon")
    return {
        "delta": delta, "epsilon_lower_bound": bound,
        "accounted_epsilon": eps, "accounted_source": privacy.get("source"),
        "site_epsilon": privacy.get("site_epsilon"),
        "consistent": eps is None or bound <= eps,
        "p_value": None if eps is None else p_value_dp(m, r, v, eps, delta),
        "false_alarm_probability": 1.0 - confidence,
        "largest_possible_bound": epsilon_lower_bound(m, r, r, delta, confidence),
    }


# ---------------------------------------------------------------------- the audit
def run_audit(cfg: AuditConfig, output: str | None = None) -> dict:
    """Canaries, training, scoring and the bound; returns (and writes) the audit report."""
    from nnunet_fed import sites as site_checks
    from nnunet_fed.federation.simulation import simulate

    site_checks.require_nnunet_paths()
    if cfg.num_canaries < 2:
        raise ValueError(f"--canaries must be >= 2, got {cfg.num_canaries}")
    if cfg.num_guesses is not None and not 0 < cfg.num_guesses <= cfg.num_canaries:
        raise ValueError(f"--guesses must lie in 1..{cfg.num_canaries}, got {cfg.num_guesses}")
    if not 0 < cfg.confidence < 1:
        raise ValueError(f"--confidence must lie in (0, 1), got {cfg.confidence}")
    site_name = site_checks.dataset_name(cfg.site)
    others = [site_checks.dataset_name(s) for s in cfg.other_sites]
    trainer_cls = site_checks.find_trainer(cfg.training.trainer)
    trainer_cls.resolve_options(cfg.training.trainer_options)  # bad options fail before anything is written

    ds = make_audit_dataset(cfg, site_name)
    sim = dataclasses.replace(cfg.training, dataset_ids=[ds["name"]] + others, site_names=[],
                              federation_name=f"Dataset{ds['id']:03d}Audit_federation", seed=cfg.seed + 12345,
                              final_validation=False, fresh=True, end_without_valid_update=True,
                              trainer_options=dict(cfg.training.trainer_options))
    out = simulate(sim)
    if out["completed_rounds"] == 0:
        raise RuntimeError(f"the audited training released no model: {out['stopped']}")
    model = out["global_model_folder"]
    fold_dir = os.path.join(model, f"fold_{sim.fold}")
    scores = score_canaries(model, sim.fold, ds["canaries"], ds["data_folder"], ds["nonmember_folder"], sim.device)
    members = [t["member"] for t in ds["canaries"]]
    r, v = guesses_from_scores(scores, members, cfg.num_guesses)
    privacy = accounted_privacy(out["site_folders"][ds["name"]], fold_dir, ds["name"])
    verdict = check_accounting(len(members), r, v, privacy, cfg.confidence, cfg.delta)
    member_scores = [s for s, mm in zip(scores, members) if mm]
    other_scores = [s for s, mm in zip(scores, members) if not mm]
    report = {
        "site": site_name, "audit_dataset": ds["name"], "trainer": sim.trainer, "configuration": sim.configuration,
        "trainer_options": dict(sim.trainer_options), "rounds": sim.rounds, "local_steps": sim.local_steps,
        "rounds_completed": out["completed_rounds"], "stopped": out["stopped"],
        "canaries": len(members), "members": int(sum(members)), "guesses": r, "correct": v,
        "canary_design": {"stamp_fraction": STAMP_FRACTION, "pattern_blocks": PATTERN_BLOCKS,
                          "label_blocks": LABEL_BLOCKS},
        "confidence": cfg.confidence, **verdict,
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


def _score(value) -> str:
    return "none" if value is None else f"{value:.3f}"


def format_report(rep: dict) -> str:
    """The report as printed by ``nnunet_fed audit``: guesses, bound, accounted epsilon and what their comparison
    means (a test with a false-alarm probability, not a proof)."""
    acc = rep["accounted_epsilon"]
    site_eps = rep.get("site_epsilon")
    source = rep.get("accounted_source") or ""
    if site_eps is not None and source.startswith("client-level"):
        source += f"; a whole site: {site_eps:.3f}"
    alarm = rep.get("false_alarm_probability")
    alarm = 1.0 - rep["confidence"] if alarm is None else alarm
    lines = [
        f"privacy audit of {rep['trainer']} at site {rep['site']} ({rep['canaries']} canaries, "
        f"{rep['members']} trained on)",
        f"  membership guesses: {rep['correct']} of {rep['guesses']} correct "
        f"(mean score members {_score(rep['mean_member_score'])}, non-members {_score(rep['mean_nonmember_score'])})",
        f"  empirical epsilon lower bound ({rep['confidence']:.0%} confidence, delta {rep['delta']:g}): "
        f"{rep['epsilon_lower_bound']:.3f}",
        f"  accounted epsilon of one case: {'none (no differential privacy)' if acc is None else f'{acc:.3f}'}"
        f"{'' if acc is None else ' (' + source + ')'}",
    ]
    if rep.get("stopped"):
        lines.append(f"  training ended after {rep['rounds_completed']} of {rep['rounds']} rounds ({rep['stopped']}); "
                     f"audited the last released global model")
    if acc is not None:
        lines.append(f"  p-value {rep['p_value']:.3g}: the probability of {rep['correct']} or more correct guesses "
                     f"if the accounted (epsilon, delta) holds")
        if rep["consistent"]:
            lines.append("  consistent: the lower bound does not exceed the accounted epsilon")
        else:
            lines.append("  WARNING: the lower bound exceeds the accounted epsilon: the privacy accounting or the "
                         "mechanism is wrong, or a chance event happened")
        largest = rep.get("largest_possible_bound")
        limit = "" if largest is None else f" (these canaries cannot show a bound above {largest:.3f})"
        lines += [f"  for a correct mechanism a bound above the accounted epsilon happens with probability at most "
                  f"{alarm:.0%} (false alarm);",
                  f"  a bound below it does not prove the accounting right{limit}"]
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
    from nnunet_fed.cli import parse_fold, parse_options

    from nnunet_fed.federation.simulation import SimulationConfig

    training = SimulationConfig(dataset_ids=list(args.datasets), configuration=args.configuration,
                                trainer=args.trainer, plans_identifier=args.plans,
                                fold=parse_fold(args.fold), rounds=args.rounds,
                                local_steps=args.local_steps, val_steps=1, device=args.device,
                                trainer_options=parse_options(args.option), progress=not args.no_progress)
    cfg = AuditConfig(training=training, num_canaries=args.canaries, num_guesses=args.guesses,
                      confidence=args.confidence, delta=args.delta, audit_id=args.audit_id, seed=args.seed)
    print(format_report(run_audit(cfg, args.output)))
    return 0
