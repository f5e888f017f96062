"""Mergeable log-bucketed histograms ("sketches") used in the shareable site summaries.

A :class:`LogSketch` stores weights on a *fixed, data-independent* grid of buckets that are equally wide in
``log|x|``::

    bucket i  (i an integer)  =  { x : round(ln|x| / width) == i }  =  [e^{width (i - 1/2)}, e^{width (i + 1/2)})

with a separate store for negative values (same grid on ``|x|``) and one ``zero`` bucket for
``|x| < zero_threshold``. Every site uses the same grid, so two sketches merge by adding weights bucket by
bucket, whatever the sites' intensity ranges. A bucket's representative value ``e^{width i}`` is within a
relative ``e^{width/2} - 1`` (about ``width / 2``) of every value in it, so every quantile read from the
sketch has that relative accuracy (the DDSketch idea). Grids nest: a sketch of width ``w`` can be coarsened
exactly to width ``k w`` for odd ``k`` (bucket boundaries line up), which lets summaries made with different
resolutions (for instance with and without differential privacy) merge.

A sketch holds bucket indices and summed weights only: no individual value.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

__all__ = ["LogSketch"]


class LogSketch:
    def __init__(self, width: float, zero_threshold: float):
        if not width > 0:
            raise ValueError(f"bucket width must be > 0, got {width!r}")
        if not zero_threshold > 0:
            raise ValueError(f"zero threshold must be > 0, got {zero_threshold!r}")
        self.width = float(width)
        self.zero_threshold = float(zero_threshold)
        self.positive: dict[int, float] = {}
        self.negative: dict[int, float] = {}
        self.zero = 0.0

    # ------------------------------------------------------------------------------------------------ build
    def index_of(self, magnitude: np.ndarray) -> np.ndarray:
        return np.rint(np.log(magnitude) / self.width).astype(np.int64)

    def add(self, values, weight: float | np.ndarray = 1.0) -> "LogSketch":
        """Add ``values`` with ``weight`` each (scalar or one weight per value)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        if x.size == 0:
            return self
        if not np.all(np.isfinite(x)):
            raise ValueError("LogSketch.add: values must be finite")
        w = np.broadcast_to(np.asarray(weight, dtype=np.float64), x.shape)
        mag = np.abs(x)
        is_zero = mag < self.zero_threshold
        if is_zero.any():
            self.zero += float(w[is_zero].sum())
        for sign, store in ((1, self.positive), (-1, self.negative)):
            sel = (~is_zero) & ((x > 0) if sign > 0 else (x < 0))
            if not sel.any():
                continue
            idx = self.index_of(mag[sel])
            lo = int(idx.min())
            sums = np.bincount(idx - lo, weights=w[sel])  # indices span at most ~ln(max/min)/width buckets
            hit = np.flatnonzero(np.bincount(idx - lo))
            for i, s in zip((hit + lo).tolist(), sums[hit].tolist()):
                store[i] = store.get(i, 0.0) + s
        return self

    def copy(self) -> "LogSketch":
        s = LogSketch(self.width, self.zero_threshold)
        s.positive = dict(self.positive)
        s.negative = dict(self.negative)
        s.zero = self.zero
        return s

    def scaled(self, factor: float) -> "LogSketch":
        s = self.copy()
        s.positive = {i: w * factor for i, w in s.positive.items()}
        s.negative = {i: w * factor for i, w in s.negative.items()}
        s.zero *= factor
        return s

    # ------------------------------------------------------------------------------------------------ merge
    def coarsened(self, width: float) -> "LogSketch":
        """The same sketch on a grid ``k`` times wider (``k`` odd; boundaries of the two grids line up)."""
        k = width / self.width
        k_int = int(round(k))
        if abs(k - k_int) > 1e-6 * k or k_int < 1 or k_int % 2 == 0:
            raise ValueError(f"cannot coarsen a sketch of bucket width {self.width} to {width}: the ratio must be "
                             f"an odd integer")
        if k_int == 1:
            return self.copy()
        m = (k_int - 1) // 2
        out = LogSketch(width, self.zero_threshold)
        out.zero = self.zero
        for src, dst in ((self.positive, out.positive), (self.negative, out.negative)):
            for i, w in src.items():
                j = (i + m) // k_int  # floor division: j*k - m <= i <= j*k + m
                dst[j] = dst.get(j, 0.0) + w
        return out

    def merge(self, other: "LogSketch") -> "LogSketch":
        """Sum of the two sketches (in place); ``other`` must be on the same grid."""
        if not math.isclose(other.width, self.width, rel_tol=1e-9) or \
                not math.isclose(other.zero_threshold, self.zero_threshold, rel_tol=1e-9):
            raise ValueError("LogSketch.merge: sketches on different grids (coarsen first)")
        for src, dst in ((other.positive, self.positive), (other.negative, self.negative)):
            for i, w in src.items():
                dst[i] = dst.get(i, 0.0) + w
        self.zero += other.zero
        return self

    @staticmethod
    def merge_all(sketches: Iterable["LogSketch"]) -> "LogSketch":
        """Sum of sketches that may have different (nested) grids: everything is brought to the coarsest."""
        sketches = list(sketches)
        if not sketches:
            raise ValueError("no sketch to merge")
        width = max(s.width for s in sketches)
        zt = sketches[0].zero_threshold
        for s in sketches:
            if not math.isclose(s.zero_threshold, zt, rel_tol=1e-9):
                raise ValueError("sketches with different zero thresholds cannot be merged")
        out = LogSketch(width, zt)
        for s in sketches:
            out.merge(s.coarsened(width))
        return out

    # ---------------------------------------------------------------------------------------------- queries
    @property
    def total(self) -> float:
        return float(sum(self.positive.values()) + sum(self.negative.values()) + self.zero)

    def _ordered(self) -> list[tuple[str, int, float]]:
        """Non-empty buckets in increasing value order: (store, index, weight)."""
        out = [("neg", i, self.negative[i]) for i in sorted(self.negative, reverse=True) if self.negative[i] > 0]
        if self.zero > 0:
            out.append(("zero", 0, self.zero))
        out += [("pos", i, self.positive[i]) for i in sorted(self.positive) if self.positive[i] > 0]
        return out

    def representative(self, store: str, i: int) -> float:
        if store == "zero":
            return 0.0
        v = math.exp(self.width * i)
        return v if store == "pos" else -v

    def _value_in_bucket(self, store: str, i: int, fraction: float) -> float:
        """Value a ``fraction`` (0..1) of the way through bucket i (geometric interpolation)."""
        if store == "zero":
            return 0.0
        fraction = min(max(fraction, 0.0), 1.0)
        if store == "pos":
            return math.exp(self.width * (i - 0.5 + fraction))
        return -math.exp(self.width * (i + 0.5 - fraction))

    def quantile(self, q: float, interpolate: bool = True) -> float:
        """The value below which a fraction ``q`` of the weight lies (relative accuracy ~ width/2)."""
        buckets = self._ordered()
        if not buckets:
            raise ValueError("quantile of an empty sketch")
        total = sum(w for _, _, w in buckets)
        target = min(max(q, 0.0), 1.0) * total
        cum = 0.0
        for store, i, w in buckets:
            if cum + w >= target:
                if not interpolate:
                    return self.representative(store, i)
                return self._value_in_bucket(store, i, (target - cum) / w)
            cum += w
        store, i, _ = buckets[-1]
        return self.representative(store, i)

    def order_statistics(self, k: int) -> np.ndarray:
        """``k`` representative values, the j-th at cumulative weight ``(j + 1/2) / k`` of the total.

        For a sketch of integer counts that sum to ``k`` this is exactly the sorted list of bucket
        representatives, one per counted item, so every percentile nnU-Net computes with ``np.percentile`` over
        a per-case list is reproduced (up to the bucket accuracy).
        """
        buckets = self._ordered()
        if not buckets or k < 1:
            raise ValueError("order statistics of an empty sketch")
        weights = np.array([w for _, _, w in buckets], dtype=np.float64)
        reps = np.array([self.representative(s, i) for s, i, _ in buckets], dtype=np.float64)
        cum = np.cumsum(weights)
        targets = (np.arange(k, dtype=np.float64) + 0.5) / k * cum[-1]
        pos = np.searchsorted(cum, targets, side="left")
        return reps[np.minimum(pos, len(reps) - 1)]

    def moments(self) -> tuple[float, float, float]:
        """(total weight, weighted sum of representatives, weighted sum of squared representatives)."""
        total = s1 = s2 = 0.0
        for store, i, w in self._ordered():
            v = self.representative(store, i)
            total += w
            s1 += w * v
            s2 += w * v * v
        return total, s1, s2

    def min(self) -> float:
        store, i, _ = self._ordered()[0]
        return self.representative(store, i)

    def max(self) -> float:
        store, i, _ = self._ordered()[-1]
        return self.representative(store, i)

    # -------------------------------------------------------------------------------------- privacy helpers
    def clamp_indices(self, max_magnitude: float, min_magnitude: float | None = None) -> "LogSketch":
        """Move weight of buckets outside ``[min_magnitude, max_magnitude]`` into the edge buckets (clamping)."""
        hi = int(self.index_of(np.array([max_magnitude]))[0])
        lo = int(self.index_of(np.array([min_magnitude if min_magnitude else self.zero_threshold]))[0])
        out = LogSketch(self.width, self.zero_threshold)
        out.zero = self.zero
        for src, dst in ((self.positive, out.positive), (self.negative, out.negative)):
            for i, w in src.items():
                j = min(max(i, lo), hi)
                dst[j] = dst.get(j, 0.0) + w
        return out

    def laplace_noised(self, scale: float, max_magnitude: float, rng: np.random.Generator,
                       min_magnitude: float | None = None, signed: bool = True,
                       threshold: float | None = None) -> tuple["LogSketch", int, float]:
        """Laplace noise of ``scale`` on *every* bucket of the fixed domain ``[min_magnitude, max_magnitude]``
        (both signs and the zero bucket if ``signed``), then negative weights set to 0 and weights below
        ``threshold`` (default ``scale * ln(20 * number of buckets)``: about 0.025 spurious buckets expected per
        histogram) dropped. Noise on the whole data-independent
        domain (not only on occupied buckets) keeps which buckets are occupied private; clipping and
        thresholding are post-processing. Returns (noised sketch, number of buckets, threshold).
        The caller must have clamped the sketch to the domain (:meth:`clamp_indices`).
        """
        hi = int(self.index_of(np.array([max_magnitude]))[0])
        lo = int(self.index_of(np.array([min_magnitude if min_magnitude else self.zero_threshold]))[0])
        idx = np.arange(lo, hi + 1)
        stores = [("pos", self.positive)] + ([("neg", self.negative)] if signed else [])
        n_buckets = len(idx) * len(stores) + (1 if signed else 0)
        if threshold is None:
            threshold = scale * math.log(20.0 * n_buckets)
        out = LogSketch(self.width, self.zero_threshold)
        for name, src in stores:
            clean = np.array([src.get(int(i), 0.0) for i in idx])
            noisy = clean + rng.laplace(0.0, scale, size=clean.shape)
            keep = noisy > threshold
            getattr(out, "positive" if name == "pos" else "negative").update(
                {int(i): float(v) for i, v in zip(idx[keep], noisy[keep])})
        if signed:
            z = self.zero + rng.laplace(0.0, scale)
            out.zero = float(z) if z > threshold else 0.0
        return out, n_buckets, float(threshold)

    # ------------------------------------------------------------------------------------------------- json
    def to_json(self) -> dict:
        def store(d):
            keys = sorted(i for i, w in d.items() if w != 0)
            return {"index": [int(i) for i in keys], "weight": [float(d[i]) for i in keys]}

        return {"bucket_width": self.width, "zero_threshold": self.zero_threshold, "zero": float(self.zero),
                "positive": store(self.positive), "negative": store(self.negative)}

    @classmethod
    def from_json(cls, d: dict) -> "LogSketch":
        try:
            s = cls(float(d["bucket_width"]), float(d["zero_threshold"]))
            s.zero = float(d.get("zero", 0.0))
            for key, target in (("positive", s.positive), ("negative", s.negative)):
                part = d.get(key) or {"index": [], "weight": []}
                if len(part["index"]) != len(part["weight"]):
                    raise ValueError(f"{key}: index and weight lists differ in length")
                for i, w in zip(part["index"], part["weight"]):
                    target[int(i)] = target.get(int(i), 0.0) + float(w)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a sketch: {e}") from None
        return s
