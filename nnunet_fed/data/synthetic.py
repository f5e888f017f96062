"""Synthetic multi-site ("federated") segmentation datasets in nnU-Net v2 raw format.

Every site is written as its own nnU-Net v2 raw dataset (``Dataset{id:03d}_{Scenario}Site{k}``) with

* ``imagesTr/case_XXXX_0000.nii.gz`` + ``labelsTr/case_XXXX.nii.gz`` (training cases),
* ``imagesTs/test_XXXX_0000.nii.gz`` + ``labelsTs/test_XXXX.nii.gz`` (held-out test cases),
* ``dataset.json`` (nnU-Net v2 format plus a ``"synthetic"`` block recording how the site was made).

Image content: an "organ" (label 1, a smooth randomly deformed ellipse/ellipsoid) that contains, in most
cases (~85 %), a "tumour" (label 2, a smaller blob lying strictly inside the organ), on a textured
background with a few small organ-like distractor blobs.  Organ and tumour differ in intensity and
texture, noise makes the intensity distributions overlap.

Site heterogeneity (all recorded in ``dataset.json["synthetic"]["site_params"]``):
intensity scale/offset, contrast gamma, noise std, multiplicative bias field amplitude, voxel spacing,
object size and elongation; optionally an inverted contrast (``inverted_sites``: tissue intensities mirrored, the
bright tumour dark, as between two MR sequences), which per-image normalisation does not undo.  The *pixel grid* is identical across sites, only the physical spacing
differs, so nnU-Net plans the same patch size and network topology at every site (needed for FedAvg).

Scenarios
---------
``"shift"``   same anatomy (shape family ``ellipse``, hyper-intense smooth tumour) at every site, different
              "scanners".
``"organs"``  each site its own organ shape family (``ellipse`` / ``rim`` / ``bean``, cycled) with its own
              tumour appearance, on top of the scanner differences.

Layouts (``layout``): how a site stores its cases, as real sites do (the anatomy above is the same)

``nifti``          (default) one channel, ``.nii.gz``, labels 0 (background), 1 (organ), 2 (tumour).
``rgb-png``        2D only: RGB ``.png`` images (nnU-Net's ``NaturalImage2DIO``, channels R, G, B, unit spacing),
                   grey-value ``.png`` labels.
``ignore-label``   sparse annotation: the left quarter of every training label is nnU-Net's ignore label (3,
                   declared as ``"ignore"``); held-out labels are complete.
``regions``        region-based training with two channels (``T1``, ``T2``): ``labels`` declares the regions
                   ``whole_organ`` = (1, 2) and ``tumour`` = 2 with ``regions_class_order`` [1, 2]; the label files
                   hold 0, 1, 2 as usual.
``no-foreground``  a site without foreground (healthy controls): images with background only, every label 0.

A tiny site is any layout with few training cases (``num_train=3``).

Everything is deterministic given ``seed`` (and the site index): identical arguments give byte-identical
arrays.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

__all__ = ["make_federated_datasets", "site_parameters", "generate_case", "SCENARIOS", "FAMILIES", "LAYOUTS"]

SCENARIOS = ("shift", "organs")
LAYOUTS = ("nifti", "rgb-png", "ignore-label", "regions", "no-foreground")
#: part of the folder name of a site in a layout other than the default: Dataset101_ShiftPngSite0
LAYOUT_TAGS = {"nifti": "", "rgb-png": "Png", "ignore-label": "Ignore", "regions": "Regions", "no-foreground": "NoFg"}
IGNORE_LABEL = 3
REGION_LABELS = {"background": 0, "whole_organ": [1, 2], "tumour": 2}  # nnU-Net: output channel k = k-th region
FAMILIES = ("ellipse", "rim", "bean")
LABELS = {"background": 0, "organ": 1, "tumour": 2}
TUMOUR_PROBABILITY = 0.85
DEFAULT_SIZE = {2: (64, 64), 3: (32, 48, 48)}
#: a contrast-inverted site's tissue intensities are ``INVERSION_LEVEL - t`` (bright tumour becomes dark)
INVERSION_LEVEL = 1.2

# "Scanner" table, cycled over the site index. Sites beyond the table get a seeded jitter on top so that
# they still differ from the earlier site sharing the same table row.
#   spacing: in-plane spacing (mm), z_ratio: z spacing / in-plane spacing (3D only; < 3 so that nnU-Net does
#   not treat the data as anisotropic), scale/offset: linear intensity mapping, gamma: contrast curve applied
#   to the tissue intensities, noise_std: additive Gaussian noise (tissue units, organ-tumour contrast ~0.3),
#   bias_amp: amplitude of the smooth multiplicative bias field, size_factor/elongation: object size/shape.
_SCANNER_TABLE = (
    dict(spacing=1.00, z_ratio=2.0, scale=1000.0, offset=0.0, gamma=1.00, noise_std=0.05, bias_amp=0.05,
         size_factor=1.00, elongation=1.25),
    dict(spacing=0.70, z_ratio=1.5, scale=400.0, offset=100.0, gamma=0.85, noise_std=0.09, bias_amp=0.20,
         size_factor=0.88, elongation=1.45),
    dict(spacing=1.35, z_ratio=2.5, scale=2500.0, offset=300.0, gamma=1.20, noise_std=0.07, bias_amp=0.30,
         size_factor=1.12, elongation=1.10),
    dict(spacing=0.85, z_ratio=1.8, scale=150.0, offset=50.0, gamma=1.10, noise_std=0.11, bias_amp=0.15,
         size_factor=0.94, elongation=1.35),
    dict(spacing=1.20, z_ratio=2.2, scale=700.0, offset=500.0, gamma=0.90, noise_std=0.06, bias_amp=0.25,
         size_factor=1.06, elongation=1.05),
    dict(spacing=0.60, z_ratio=1.2, scale=1200.0, offset=20.0, gamma=1.05, noise_std=0.10, bias_amp=0.10,
         size_factor=0.97, elongation=1.50),
)

# Anatomy (shape family + tumour appearance). Intensities are in "tissue units" (background ~0.2).
#   organ_radius: organ radius in normalised image coordinates ([-1, 1] per axis), elongation: extra axis
#   ratio multiplied onto the site elongation, deform: amplitude of the low-frequency radius harmonics,
#   bend: parabolic bending (bean shape), rim_width/rim_intensity: darker organ rim (in pixels of a 64 grid,
#   scaled with the grid size),
#   tumour_*: tumour mean intensity, texture amplitude and texture scale (pixels).
_FAMILY_PARAMS = {
    "ellipse": dict(organ_radius=0.52, elongation=1.0, deform=0.06, bend=0.0, rim_width=0.0, rim_intensity=0.0,
                    organ_intensity=0.60, organ_texture=0.04,
                    tumour_intensity=0.92, tumour_texture=0.03, tumour_texture_sigma=2.0,
                    tumour_appearance="hyperintense_smooth"),
    "rim": dict(organ_radius=0.54, elongation=0.8, deform=0.05, bend=0.0, rim_width=2.5, rim_intensity=0.40,
                organ_intensity=0.62, organ_texture=0.04,
                tumour_intensity=0.24, tumour_texture=0.05, tumour_texture_sigma=1.5,
                tumour_appearance="hypointense_smooth"),
    "bean": dict(organ_radius=0.44, elongation=1.5, deform=0.05, bend=0.6, rim_width=0.0, rim_intensity=0.0,
                 organ_intensity=0.55, organ_texture=0.04,
                 tumour_intensity=0.88, tumour_texture=0.16, tumour_texture_sigma=0.7,
                 tumour_appearance="hyperintense_textured"),
}
_BACKGROUND = dict(mean=0.20, coarse_texture=0.07, fine_texture=0.03, distractor_intensity=0.50)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _scenario_folder_name(dataset_id: int, scenario: str, site: int, layout: str = "nifti") -> str:
    return f"Dataset{dataset_id:03d}_{scenario.capitalize()}{LAYOUT_TAGS[layout]}Site{site}"


def site_parameters(site: int, scenario: str = "shift", dim: int = 2, seed: int = 0,
                    contrast_inverted: bool = False) -> dict:
    """Heterogeneity parameters of site ``site`` (plain python types, JSON serialisable)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"Unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    base = dict(_SCANNER_TABLE[site % len(_SCANNER_TABLE)])
    if site >= len(_SCANNER_TABLE):
        r = _rng(seed, site, 7919)
        base["spacing"] *= float(r.uniform(0.85, 1.15))
        base["scale"] *= float(r.uniform(0.7, 1.4))
        base["offset"] += float(r.uniform(-50, 50))
        base["gamma"] *= float(r.uniform(0.93, 1.07))
        base["noise_std"] *= float(r.uniform(0.8, 1.2))
        base["bias_amp"] = float(np.clip(base["bias_amp"] + r.uniform(-0.05, 0.05), 0.0, 0.35))
        base["size_factor"] *= float(r.uniform(0.95, 1.05))
        base["elongation"] *= float(r.uniform(0.95, 1.05))
    family = "ellipse" if scenario == "shift" else FAMILIES[site % len(FAMILIES)]
    inplane = round(float(base["spacing"]), 4)
    if dim == 2:
        spacing_zyx = [inplane, inplane]
    else:
        spacing_zyx = [round(inplane * float(base["z_ratio"]), 4), inplane, inplane]
    params = {
        "family": family,
        "tumour_appearance": _FAMILY_PARAMS[family]["tumour_appearance"],
        "spacing_zyx": spacing_zyx,
        "intensity_scale": round(float(base["scale"]), 4),
        "intensity_offset": round(float(base["offset"]), 4),
        "gamma": round(float(base["gamma"]), 4),
        "noise_std": round(float(base["noise_std"]), 5),
        "bias_field_amplitude": round(float(base["bias_amp"]), 5),
        "object_size_factor": round(float(base["size_factor"]), 5),
        "object_elongation": round(float(base["elongation"]), 5),
        "contrast_inverted": bool(contrast_inverted),
    }
    return params


# ----------------------------------------------------------------------------------------------- geometry
def _grid(shape: tuple) -> list[np.ndarray]:
    """Normalised coordinates in about [-1, 1] along every axis (z, y, x order)."""
    axes = [(np.arange(n, dtype=np.float64) - (n - 1) / 2.0) / (n / 2.0) for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _blob(coords: list[np.ndarray], center, radii, angle: float, deform: float, rng: np.random.Generator,
          bend: float = 0.0, n_harmonics: int = 4) -> np.ndarray:
    """Boolean mask of a deformed ellipse/ellipsoid.

    ``radii`` are (long, short[, z]) radii in normalised coordinates. The in-plane axes (last two) are rotated
    by ``angle``; ``bend`` bends the shape parabolically (bean); the radius is modulated by a few random
    low-frequency harmonics of the direction vector (smooth on the circle/sphere).
    """
    dim = len(coords)
    dy = coords[-2] - center[-2]
    dx = coords[-1] - center[-1]
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dx + s * dy) / radii[0]
    v = (-s * dx + c * dy) / radii[1]
    if bend:
        v = v - bend * (u ** 2 - 0.5)
    q = [u, v]
    if dim == 3:
        q.append((coords[0] - center[0]) / radii[2])
    rho = np.sqrt(sum(a * a for a in q)) + 1e-9
    f = np.ones_like(rho)
    if deform > 0:
        for _ in range(n_harmonics):
            w = rng.normal(size=dim) * 2.2
            amp = deform * rng.uniform(0.5, 1.0) / np.sqrt(n_harmonics) * 2.0
            phase = rng.uniform(0, 2 * np.pi)
            f = f + amp * np.cos(sum(wi * qi for wi, qi in zip(w, q)) / rho + phase)
    return rho < f


def _smooth_noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit std."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    sd = n.std()
    return n / sd if sd > 0 else n


def _bias_field(coords, amp: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field 1 + amp * g with g in [-1, 1] (a couple of long-wavelength cosines)."""
    dim = len(coords)
    g = np.zeros_like(coords[0])
    for _ in range(2):
        w = rng.normal(size=dim)
        w = w / (np.linalg.norm(w) + 1e-9) * rng.uniform(0.8, 1.8)
        g = g + np.cos(sum(wi * ci for wi, ci in zip(w, coords)) + rng.uniform(0, 2 * np.pi))
    g = g / max(np.abs(g).max(), 1e-9)
    return 1.0 + amp * g


def generate_case(shape: tuple, params: dict, rng: np.random.Generator,
                  foreground: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """One synthetic case. Returns (image float32, label uint8, info dict). ``foreground=False``: a case without
    organ and tumour (background texture only, label all 0)."""
    dim = len(shape)
    fam = _FAMILY_PARAMS[params["family"]]
    coords = _grid(shape)
    half = np.array(shape, dtype=np.float64) / 2.0

    # ---- organ
    radius = fam["organ_radius"] * params["object_size_factor"] * rng.uniform(0.9, 1.1)
    elong = fam["elongation"] * params["object_elongation"] * rng.uniform(0.92, 1.08)
    radii = [radius * np.sqrt(elong), radius / np.sqrt(elong), radius * rng.uniform(0.85, 1.05)]
    center = rng.uniform(-0.1, 0.1, size=dim)
    angle = rng.uniform(0, np.pi)
    organ = _blob(coords, center, radii, angle, fam["deform"], rng, bend=fam["bend"])
    organ = ndimage.binary_fill_holes(organ)
    if dim == 3:  # keep one connected organ
        lab, n = ndimage.label(organ)
        if n > 1:
            sizes = ndimage.sum(organ, lab, index=np.arange(1, n + 1))
            organ = lab == (1 + int(np.argmax(sizes)))
    # distances inside the organ, in normalised units and in in-plane pixels (the object geometry is defined
    # in normalised coordinates, so a z voxel of a thinner z grid counts as more than one in-plane pixel)
    edt_norm = ndimage.distance_transform_edt(organ, sampling=1.0 / half)
    edt_pix = edt_norm * half.max()
    # plain voxel distance: > sqrt(dim) guarantees every (8/26-)neighbour of a tumour voxel is organ
    edt_vox = ndimage.distance_transform_edt(organ)
    rim_pix = fam["rim_width"] * half.max() / 32.0
    if rim_pix > 0:
        rim_pix = max(rim_pix, 1.0)

    label = organ.astype(np.uint8)

    # ---- tumour (strictly inside the organ, away from boundary / rim)
    has_tumour = bool(rng.random() < TUMOUR_PROBABILITY)
    margin_pix = max(1.8, 0.06 * half.max()) + rim_pix
    t_radius = radius * rng.uniform(0.28, 0.42)
    t_elong = rng.uniform(0.8, 1.25)
    t_angle = rng.uniform(0, np.pi)
    tumour = np.zeros(shape, dtype=bool)
    if has_tumour:
        for _ in range(6):
            t_radii = [t_radius * np.sqrt(t_elong), t_radius / np.sqrt(t_elong), t_radius]
            need = max(t_radii) * 0.95 + margin_pix / half.max()
            cand = np.flatnonzero((edt_norm >= need).ravel())
            if cand.size:
                idx = np.unravel_index(cand[rng.integers(cand.size)], shape)
                t_center = np.array([coords[d][idx] for d in range(dim)])
                tumour = _blob(coords, t_center, t_radii, t_angle, 0.08, rng, n_harmonics=3)
                tumour &= (edt_pix > margin_pix) & (edt_vox > np.sqrt(dim) + 0.05)
                if tumour.sum() >= 4:
                    break
            t_radius *= 0.8
        if tumour.sum() < 4:
            tumour[:] = False
    if not foreground:  # a healthy control: nothing to segment
        organ = np.zeros(shape, dtype=bool)
        tumour = np.zeros(shape, dtype=bool)
        label[:] = 0
    has_tumour = bool(tumour.any())
    label[tumour] = 2

    # ---- tissue intensities
    bg = _BACKGROUND
    tissue = (bg["mean"]
              + bg["coarse_texture"] * _smooth_noise(shape, max(shape) / 10.0, rng)
              + bg["fine_texture"] * _smooth_noise(shape, 1.0, rng))
    # small organ-like distractors in the background (not touching the organ)
    out_norm = ndimage.distance_transform_edt(~organ, sampling=1.0 / half) if organ.any() else \
        np.full(shape, np.inf)
    for _ in range(int(rng.integers(0, 3))):
        r = radius * rng.uniform(0.12, 0.2)
        cand = np.flatnonzero((out_norm > r * 1.3 + 0.08).ravel())
        cand = cand[np.all(np.abs(np.stack([c.ravel()[cand] for c in coords])) < 0.85, axis=0)]
        if cand.size == 0:
            break
        idx = np.unravel_index(cand[rng.integers(cand.size)], shape)
        d_center = np.array([coords[d][idx] for d in range(dim)])
        d_mask = _blob(coords, d_center, [r, r * rng.uniform(0.6, 1.0), r], rng.uniform(0, np.pi), 0.05, rng,
                       n_harmonics=2) & ~organ
        tissue[d_mask] = bg["distractor_intensity"] + 0.05 * rng.standard_normal()

    organ_tex = _smooth_noise(shape, 1.5, rng)
    tissue[organ] = fam["organ_intensity"] + fam["organ_texture"] * organ_tex[organ]
    if rim_pix > 0:
        rim = organ & (edt_pix <= rim_pix)
        tissue[rim] = fam["rim_intensity"] + fam["organ_texture"] * organ_tex[rim]
    if has_tumour and foreground:
        t_tex = _smooth_noise(shape, fam["tumour_texture_sigma"], rng)
        t_int = fam["tumour_intensity"] + rng.uniform(-0.03, 0.03)
        tissue[tumour] = t_int + fam["tumour_texture"] * t_tex[tumour]
    # partial volume blur
    tissue = ndimage.gaussian_filter(tissue, sigma=0.6, mode="nearest")

    # ---- "scanner"
    tissue = np.clip(tissue, 0.0, None) ** params["gamma"]
    tissue = tissue * _bias_field(coords, params["bias_field_amplitude"], rng)
    tissue = tissue + params["noise_std"] * rng.standard_normal(shape)
    if params.get("contrast_inverted"):  # a scanner whose contrast runs the other way (T1 against T2, say)
        tissue = INVERSION_LEVEL - tissue
    image = (tissue * params["intensity_scale"] + params["intensity_offset"]).astype(np.float32)
    info = {"has_tumour": has_tumour, "organ_voxels": int(organ.sum()), "tumour_voxels": int(tumour.sum())}
    return image, label, info


# ------------------------------------------------------------------------------------------------------ io
def _write(arr: np.ndarray, spacing_zyx, path: str) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))  # sitk wants (x, y[, z])
    sitk.WriteImage(img, path, useCompression=True)


def _write_png(arr: np.ndarray, path: str) -> None:
    from skimage import io  # what nnU-Net's NaturalImage2DIO reads with

    io.imsave(path, arr, check_contrast=False)


def _to_rgb(image: np.ndarray, params: dict) -> np.ndarray:
    """(H, W) scanner intensities -> (H, W, 3) uint8: the tissue value spread over three differently weighted
    channels (the site's intensity scale and offset undone first, so that every site uses the 0..255 range)."""
    tissue = (image - params["intensity_offset"]) / params["intensity_scale"]
    v = np.clip(tissue, 0.0, 1.2) / 1.2
    rgb = np.stack([v, 0.25 + 0.6 * v, 1.0 - 0.7 * v], axis=-1)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def _second_channel(image: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    """A second contrast ("T2") of the same anatomy: inverted tissue contrast plus its own noise."""
    tissue = (image - params["intensity_offset"]) / params["intensity_scale"]
    t2 = 1.2 - tissue + 0.03 * rng.standard_normal(image.shape)
    return (t2 * 0.5 * params["intensity_scale"] + params["intensity_offset"]).astype(np.float32)


def _layout_json(layout: str, modality: str) -> dict:
    """The dataset.json entries that depend on the layout."""
    if layout == "rgb-png":
        return {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": dict(LABELS), "file_ending": ".png",
                "overwrite_image_reader_writer": "NaturalImage2DIO"}
    if layout == "ignore-label":
        return {"channel_names": {"0": modality}, "labels": {**LABELS, "ignore": IGNORE_LABEL},
                "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO"}
    if layout == "regions":
        return {"channel_names": {"0": "T1", "1": "T2"}, "labels": json.loads(json.dumps(REGION_LABELS)),
                "regions_class_order": [1, 2], "file_ending": ".nii.gz",
                "overwrite_image_reader_writer": "SimpleITKIO"}
    return {"channel_names": {"0": modality}, "labels": dict(LABELS), "file_ending": ".nii.gz",
            "overwrite_image_reader_writer": "SimpleITKIO"}


def _write_case(layout: str, image: np.ndarray, label: np.ndarray, params: dict, folder: str, img_dir: str,
                lab_dir: str, identifier: str, training: bool, rng: np.random.Generator) -> None:
    img_path = os.path.join(folder, img_dir, identifier)
    lab_path = os.path.join(folder, lab_dir, identifier)
    if layout == "rgb-png":
        _write_png(_to_rgb(image, params), img_path + "_0000.png")
        _write_png(label.astype(np.uint8), lab_path + ".png")
        return
    spacing = params["spacing_zyx"]
    _write(image, spacing, img_path + "_0000.nii.gz")
    if layout == "regions":
        _write(_second_channel(image, params, rng), spacing, img_path + "_0001.nii.gz")
    if layout == "ignore-label" and training:  # sparse annotation: the left quarter is not annotated
        label = label.copy()
        label[..., : max(1, label.shape[-1] // 4)] = IGNORE_LABEL
    _write(label, spacing, lab_path + ".nii.gz")


def make_federated_datasets(first_id: int = 101, num_sites: int = 3, scenario: str = "shift", dim: int = 2,
                            num_train: int = 40, num_test: int = 10, seed: int = 0,
                            image_size: tuple | None = None, modality: str = "MRI",
                            raw_root: str | None = None, overwrite: bool = False, layout: str = "nifti",
                            inverted_sites=()) -> list[str]:
    """Write ``num_sites`` synthetic nnU-Net v2 raw datasets and return their folder names.

    Site ``k`` gets dataset id ``first_id + k`` and folder ``Dataset{id:03d}_{Scenario}{Layout}Site{k}`` under
    ``raw_root`` (default: ``$nnUNet_raw``); ``layout`` is one of ``LAYOUTS`` (module docstring), its tag is
    empty for the default ``nifti``. ``inverted_sites``: indices (0-based) of sites whose contrast is inverted.
    Raises ``ValueError`` for a bad argument and ``FileExistsError`` for an
    existing folder (unless ``overwrite``), before anything is written.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"Unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "rgb-png" and dim != 2:
        raise ValueError(f"layout 'rgb-png' is 2D only (nnU-Net's NaturalImage2DIO), got dim={dim}")
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    if int(num_sites) < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites!r}")
    if int(num_train) < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train!r}")
    if int(num_test) < 0:
        raise ValueError(f"num_test must be >= 0, got {num_test!r}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    inverted_sites = sorted({int(k) for k in inverted_sites})
    if any(k < 0 or k >= int(num_sites) for k in inverted_sites):
        raise ValueError(f"inverted_sites {inverted_sites} must be site indices in 0..{int(num_sites) - 1}")
    if int(first_id) < 1 or int(first_id) + int(num_sites) - 1 > 999:
        raise ValueError(f"dataset ids {first_id}..{first_id + num_sites - 1} must lie in 1..999")
    shape = tuple(int(s) for s in (image_size if image_size is not None else DEFAULT_SIZE[dim]))
    if len(shape) != dim:
        raise ValueError(f"image_size {image_size!r} must have {dim} entries for dim={dim}")
    if min(shape) < 16:
        raise ValueError(f"image_size {image_size!r}: every axis must be >= 16 pixels")

    if raw_root is None:
        raw_root = os.environ.get("nnUNet_raw")
        if not raw_root:
            raise RuntimeError("No raw_root given and the nnUNet_raw environment variable is not set. "
                               "Set nnUNet_raw (export nnUNet_raw=/path/to/nnUNet_raw) or pass raw_root=.")
    raw_root = str(raw_root)

    names = [_scenario_folder_name(first_id + k, scenario, k, layout) for k in range(num_sites)]
    existing = [n for n in names if os.path.exists(os.path.join(raw_root, n))]
    if existing and not overwrite:
        raise FileExistsError(f"Target dataset folder(s) already exist in {raw_root}: {', '.join(existing)} "
                              f"(pass overwrite=True to replace them)")
    for n in existing:
        shutil.rmtree(os.path.join(raw_root, n))

    for k, name in enumerate(names):
        params = site_parameters(k, scenario, dim, seed, contrast_inverted=k in inverted_sites)
        folder = os.path.join(raw_root, name)
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        n_tumour = {"train": 0, "test": 0}
        for split, prefix, n_cases, split_key, img_dir, lab_dir in (
                ("train", "case", num_train, 0, "imagesTr", "labelsTr"),
                ("test", "test", num_test, 1, "imagesTs", "labelsTs")):
            for i in range(n_cases):
                rng = _rng(seed, k, split_key, i)
                image, label, info = generate_case(shape, params, rng, foreground=layout != "no-foreground")
                n_tumour[split] += int(info["has_tumour"])
                _write_case(layout, image, label, params, folder, img_dir, lab_dir, f"{prefix}_{i:04d}",
                            split == "train", rng)

        dataset_json = {
            "name": name,
            "description": f"Synthetic federated segmentation dataset (scenario={scenario}, site={k})",
            "reference": "nnunet_fed.data.synthetic",
            "licence": "CC0",
            **_layout_json(layout, modality),
            "numTraining": int(num_train),
            "synthetic": {
                "scenario": scenario,
                "layout": layout,
                "site": k,
                "num_sites": int(num_sites),
                "seed": int(seed),
                "dim": int(dim),
                "image_size": list(shape),
                "num_test": int(num_test),
                "num_train_with_tumour": n_tumour["train"],
                "num_test_with_tumour": n_tumour["test"],
                "tumour_probability": TUMOUR_PROBABILITY,
                "site_params": params,
            },
        }
        with open(os.path.join(folder, "dataset.json"), "w") as f:
            json.dump(dataset_json, f, indent=2)
    return names
