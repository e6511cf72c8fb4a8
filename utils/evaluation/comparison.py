"""The evaluation's comparison rows: the samples beside what averaging and a perfect sampler would score.

Rows (each a set of images with the split index of the mask that conditioned each one):

- ``samples``: the generated images;
- ``mean_of_k``: per mask, the mean of its K samples (:mod:`utils.evaluation.diversity`): a blurred average,
  not an image, so a paired metric it wins is a paired metric that rewards averaging;
- ``oracle`` (phantom data only, :mod:`utils.data.oracle`): for every sample a second real image of its mask,
  the k-th sample of a mask matched by the phantom's k-th redraw: what a perfect sampler scores;
- ``real``: the split's real images themselves (distribution metrics only): the real-vs-real value of the
  reference;
- ``constant`` (paired metrics only): for every mask a flat image at the training split's mean intensity: what a
  model that learned only the mean brightness scores, the floor under which :func:`below_constant` calls a model
  untrained or broken where the oracle clears it (on the echo phantom at 64 px: SSIM 0.13 and PSNR 17 dB, the
  oracle 0.53 and 20 dB, noise 0.004 and 6 dB).

Every row gets the paired metrics against the mask's real image (except ``real``), the Fréchet Radiomics
Distance of each requested version and precision/recall/density/coverage in the first version's radiomic
feature space (and in Inception space when its features are given), all against one reference set (the
training split), and for rows with K >= 2 images per mask the per-mask diversity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

ROWS = ("samples", "mean_of_k", "oracle", "real", "constant")
PRDC = ("precision", "recall", "density", "coverage")
ROW_LABELS = {"samples": "samples", "mean_of_k": "mean of K samples per mask (an average, not an image)",
              "oracle": "oracle: a second real image of each mask (a perfect sampler)",
              "real": "real images of the split (real vs reference)",
              "constant": "a constant image at the training mean intensity (learned nothing)"}
# where any model that learned something beats a flat image; not the edge-map metrics (a flat image has no edges)
FLOOR_METRICS = ("ssim", "ms_ssim", "psnr")


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, 1, H, W] or [N, 1, D, H, W] float in [0, 1]
    indices: np.ndarray  # [N] split index of each image's mask
    paired: bool = True  # whether paired metrics against the mask's real image mean anything
    per_image: dict | None = None  # its paired metrics when already computed ({metric: [N]})
    cache_key: str | None = None  # real data (the same in every run of a study): features cached under this key
    distribution: torch.Tensor | None = None  # the images the distribution metrics score (default: all)
    distributional: bool = True  # whether distribution metrics mean anything (not for copies of one flat image)


@dataclass
class Reference:
    """The distribution metrics' reference: raw radiomic features per FRD version (and Inception features)."""

    radiomic: dict[str, np.ndarray]
    inception: np.ndarray | None = None
    cache: object = None  # a FeatureCache for the rows with a cache_key, or None


def build_sets(images, indices, per_image: dict, real, oracle: torch.Tensor | None, grouped: dict,
               constant: float) -> dict[str, ImageSet]:
    """The rows' image sets; ``per_image``: the samples' paired metrics; ``real``: the split's real images by
    mask index; ``oracle`` matches ``images`` one to one (None off phantom data); ``grouped``:
    :func:`utils.evaluation.diversity.groups` of ``indices`` ({} when no mask has 2 samples); ``constant``: the
    intensity in [0, 1] of the constant row's flat images, one for each mask the samples have.

    The distribution metrics of every row score one image per mask, of the same masks (those with K samples):
    the first sample (or oracle image) of each, the mean of its K samples, its real image. FRD, coverage and the
    k-NN radii of precision/recall depend on N, and K samples of one mask would make each other's nearest
    neighbours, so rows of different N, or with K per mask, would not be comparable."""
    from utils.evaluation.diversity import mean_of_samples

    indices = np.asarray(indices)
    used = np.array(list(grouped)) if grouped else np.unique(indices)
    first = torch.as_tensor([np.flatnonzero(indices == i)[0] for i in used])
    sets = {"samples": ImageSet(images, indices, per_image=per_image, distribution=images[first])}
    if grouped:
        means, mean_indices = mean_of_samples(images, grouped)
        sets["mean_of_k"] = ImageSet(means, mean_indices)
    if oracle is not None:
        sets["oracle"] = ImageSet(oracle, indices, cache_key="oracle", distribution=oracle[first])
    sets["real"] = ImageSet(real[torch.as_tensor(used)], used, paired=False, cache_key="split")
    masks = np.unique(indices)
    sets["constant"] = ImageSet(torch.full_like(real[torch.as_tensor(masks)], constant), masks, distributional=False)
    return sets


def oracle_redraws(indices) -> np.ndarray:
    """For each sample, how many earlier samples share its mask: the phantom redraw that stands in for it."""
    indices = np.asarray(indices)
    seen: dict[int, int] = {}
    out = np.empty(len(indices), dtype=np.int64)
    for n, i in enumerate(indices.tolist()):
        out[n] = seen.get(i, 0)
        seen[i] = out[n] + 1
    return out


def row_metrics(s: ImageSet, real, masks, reference: Reference, extractors: dict, paired_fn, n_boot: int,
                inception=None) -> tuple[dict[str, dict], dict[str, dict[int, float]]]:
    """({metric: {"value", ...}}, {metric: {mask: value}}) of one row: paired metrics (mean over images, 95%
    cluster-bootstrap interval over masks), FRD per version, precision/recall/density/coverage, and per-mask
    diversity when K >= 2; the second dict holds the per-mask values of the paired and diversity metrics."""
    from utils.evaluation.diversity import groups, per_mask_diversity
    from utils.evaluation.metrics import summarise

    out: dict[str, dict] = {}
    per_mask: dict[str, dict[int, float]] = {}
    if s.paired:
        idx = torch.as_tensor(s.indices)
        per_image = s.per_image or paired_fn(s.images, real[idx], masks[idx])
        for name, values in per_image.items():
            out[name] = summary_cell(summarise(values, s.indices, n_boot=n_boot, seed=0))
            per_mask[name] = _mask_means(np.asarray(values, np.float64), s.indices)
    if s.distributional:
        images = s.images if s.distribution is None else s.distribution
        out.update(distribution_metrics(images, reference, extractors, inception, s.cache_key))
    grouped = groups(s.indices)
    if grouped:
        k = len(next(iter(grouped.values())))
        for name, values in per_mask_diversity(s.images, grouped).items():
            out[name] = {**summary_cell(summarise(values, n_boot=n_boot, seed=0)), "k": k}
            per_mask[name] = dict(zip(grouped, values.tolist()))
    return out, per_mask


def _mask_means(values: np.ndarray, indices: np.ndarray) -> dict[int, float]:
    """{mask: mean of its finite values} (masks whose values are all non-finite left out)."""
    out = {}
    for i in np.unique(indices):
        v = values[indices == i]
        if np.isfinite(v).any():
            out[int(i)] = float(v[np.isfinite(v)].mean())
    return out


def distribution_metrics(images, reference: Reference, extractors: dict, inception=None,
                         cache_key: str | None = None) -> dict[str, dict]:
    """FRD of each version in ``extractors`` ({version: RadiomicsExtractor}) and PRDC in the first version's
    space (``precision`` ...) and, with ``inception`` (an extractor), in Inception space (``precision_inception``
    ...), of ``images`` against ``reference``; with ``cache_key`` the features go through ``reference.cache``."""
    def features(extractor):
        if cache_key and reference.cache is not None:
            return reference.cache.features(cache_key, extractor, images)
        return extractor(images)

    from utils.evaluation.distribution import PRDC_K, prdc, standardise
    from utils.evaluation.radiomics import frechet_radiomics_distance

    n = {"n": len(images), "n_reference": len(next(iter(reference.radiomic.values()), []))}
    if min(n.values()) < 2:
        return {m: {"skipped": f"FRD needs 2 images per set, got {n}"} for m in (*(f"frd_{v}" for v in extractors),
                                                                                 *PRDC)}
    out: dict[str, dict] = {}
    for k, (version, extractor) in enumerate(extractors.items()):
        feats, ref = (_extracted(f) for f in (features(extractor), reference.radiomic[version]))
        n = {"n": len(feats), "n_reference": len(ref), "n_failed": len(images) - len(feats)}
        out[f"frd_{version}"] = {"value": _finite(frechet_radiomics_distance(ref, feats, version)), **n}
        if k == 0 and min(len(feats), len(ref)) > PRDC_K:
            scores = prdc(*standardise(ref, feats))
            out.update({m: {"value": v, "space": f"radiomics {version}", **n} for m, v in scores.items()})
        elif k == 0:
            out.update({m: {"skipped": f"the k-NN balls (k = {PRDC_K}) need more than {PRDC_K} images per set, got "
                                       f"{n}"} for m in PRDC})
    if inception is not None and reference.inception is not None:
        if min(len(images), len(reference.inception)) > PRDC_K:
            scores = prdc(reference.inception, features(inception))
            out.update({f"{m}_inception": {"value": v, "space": "inception", "n": len(images),
                                           "n_reference": len(reference.inception)} for m, v in scores.items()})
        else:
            out.update({f"{m}_inception": {"skipped": f"the k-NN balls need more than {PRDC_K} images per set"}
                        for m in PRDC})
    return out


def _extracted(features: np.ndarray) -> np.ndarray:
    """The rows of images whose radiomic features could be extracted (a failed image is a row of NaN)."""
    return features[~np.isnan(features).all(axis=1)]


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def summary_cell(s: dict) -> dict:
    """A per-image metric's cell of metrics.json from :func:`utils.evaluation.metrics.summarise`: value, n, masks
    and the 95% interval, non-finite numbers as None (JSON has no inf)."""
    finite = [None if v is None else _finite(v) for v in (s["mean"], s["ci95_lo"], s["ci95_hi"])]
    return {"value": finite[0], "n": s["n"], "n_masks": s["n_clusters"], "ci95": finite[1:]}


def compare(sets: dict[str, ImageSet], real, masks, reference: Reference, extractors: dict, paired_fn,
            n_boot: int, inception=None) -> dict[str, dict]:
    """{row: row_metrics} for every row of ``sets``, in :data:`ROWS` order."""
    rows, per_mask = {}, {}
    for name in ROWS:
        if name in sets:
            log.info("comparison row '%s': %d images", name, len(sets[name].images))
            rows[name], per_mask[name] = row_metrics(sets[name], real, masks, reference, extractors, paired_fn,
                                                     n_boot, inception)
    if "oracle" in rows:
        for name in ("samples", "mean_of_k"):
            if name in rows:
                _against_oracle(rows[name], per_mask[name], per_mask["oracle"], n_boot)
    return rows


def _against_oracle(row: dict, mine: dict, oracle: dict, n_boot: int) -> None:
    """Add ``vs_oracle`` ({"difference", "ci95", "flag"}) to each paired and diversity metric of ``row``: the mean
    over masks of (row - oracle) per mask with a 95% bootstrap interval over masks, flagged only when that
    interval excludes 0 (:func:`flag`)."""
    from utils.evaluation.metrics import bootstrap_ci

    for metric, values in mine.items():
        common = [m for m in values if m in oracle.get(metric, {})]
        if len(common) < 2:
            continue
        d = np.array([values[m] - oracle[metric][m] for m in common])
        mean, lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=0)
        row[metric]["vs_oracle"] = {"difference": mean, "ci95": [lo, hi], "n_masks": len(common),
                                    "flag": flag(metric, lo, hi)}


def flag(metric: str, lo: float, hi: float) -> str:
    """For an interval [lo, hi] of (model - oracle): :data:`FLAG_AVERAGING` when a paired metric is surely better
    than a perfect sampler's (only averaging gets there), :data:`FLAG_COLLAPSE` when the diversity is surely
    lower; else ""."""
    from utils.evaluation.columns import DIVERSITY, HIGHER_IS_BETTER, PAIRED

    if metric in PAIRED and (lo > 0 if HIGHER_IS_BETTER[metric] else hi < 0):
        return FLAG_AVERAGING
    return FLAG_COLLAPSE if metric in DIVERSITY and hi < 0 else ""


def evaluate_rows(images, indices, per_image: dict, real, masks, records: list[dict], reference_images,
                  synthetic: dict | None, paired_fn, n_boot: int, cache, inception=None) -> dict:
    """Everything the comparison reports for one evaluation: ``{"rows": {row: metrics}, "oracle": "used" | why not,
    "n_reference": N, "constant": the constant row's intensity (the training split's mean)}``.
    ``images``/``indices``/``per_image``: the samples, the split index of each one's mask and their paired metrics;
    ``real``/``masks``/``records``: the split; ``reference_images``: the training split (the distribution metrics'
    reference, and the constant row's mean); ``synthetic``: ``data_args.synthetic`` (the oracle);
    ``cache``: a :class:`utils.evaluation.feature_extractors.FeatureCache` for the reference's features;
    ``inception``: an Inception extractor for PRDC in Inception space, or None."""
    from utils.data.oracle import OracleUnavailable
    from utils.evaluation.diversity import groups
    from utils.evaluation.radiomics import FRD_VERSIONS, RadiomicsExtractor

    extractors = {v: RadiomicsExtractor(v) for v in FRD_VERSIONS}
    log.info("radiomic features of the %d reference images (cached)", len(reference_images))
    reference = Reference({v: cache.features("reference", e, reference_images) for v, e in extractors.items()},
                          None if inception is None else cache.features("reference", inception, reference_images),
                          cache)
    try:
        oracle, oracle_note = oracle_set(records, synthetic, indices), "used"
    except OracleUnavailable as e:
        oracle, oracle_note = None, f"no oracle row: {e}"
        log.info("%s", oracle_note)
    constant = float(reference_images.mean())
    sets = build_sets(images, indices, per_image, real, oracle, groups(indices), constant)
    rows = compare(sets, real, masks, reference, extractors, paired_fn, n_boot, inception)
    return {"rows": rows, "oracle": oracle_note, "n_reference": len(reference_images), "constant": constant}


def oracle_set(records: list[dict], synthetic: dict | None, indices) -> torch.Tensor:
    """The oracle's images ``[N, 1, ...]`` in [0, 1], one per sample: the k-th sample of a mask gets the
    phantom's k-th redraw of it (:func:`oracle_redraws`); raises OracleUnavailable off phantom data."""
    from utils.data.dataset_io import normalise_image
    from utils.data.oracle import oracle_images

    indices = np.asarray(indices)
    redraws = oracle_redraws(indices)
    out = np.empty((len(indices), *np.asarray(records[0]["mask"]).shape), dtype=np.uint8)  # [N, 1, ...]
    for k in np.unique(redraws):
        at = np.flatnonzero(redraws == k)
        out[at] = oracle_images([records[i] for i in indices[at]], synthetic, int(k))
    return torch.from_numpy(normalise_image(out))


FLAG_AVERAGING = "▲"  # a paired score above the oracle's
FLAG_COLLAPSE = "▼"  # less diverse than the oracle
FLAG_BROKEN = "⚠"  # worse than a constant image


def flags(rows: dict[str, dict]) -> dict[str, dict[str, str]]:
    """{row: {metric: flag}} of the model rows, from their ``vs_oracle`` intervals; nothing without an oracle."""
    return {name: {m: c["vs_oracle"]["flag"] for m, c in rows[name].items() if c.get("vs_oracle", {}).get("flag")}
            for name in ("samples", "mean_of_k") if name in rows}


def below_constant(rows: dict[str, dict]) -> list[str]:
    """A warning for each of :data:`FLOOR_METRICS` on which the samples score below the constant row (all of them
    higher-is-better): the model has not learned even the mean intensity. A perfect sampler's independent draw
    can score below that floor too, on data whose texture varies more than the mask explains (its error is twice
    that variance, the constant's that variance plus what the mask explains): where the oracle row does, the floor
    says nothing and there is no warning; without an oracle row the warning says it is unchecked."""
    from utils.evaluation.columns import label

    lines = []
    for metric in FLOOR_METRICS:
        mine, floor, oracle = (rows.get(r, {}).get(metric, {}).get("value") for r in ("samples", "constant", "oracle"))
        if mine is None or floor is None or mine >= floor:  # None: skipped, or PSNR of identical images
            continue
        if oracle is not None and oracle <= floor:
            continue
        verdict = ("the model looks untrained or broken" if oracle is not None else "the model may be untrained or "
                   "broken (no oracle row checks that a perfect sampler scores above it on these data)")
        lines.append(f"{FLAG_BROKEN} {label(metric)} {mine:.3g} is below what a constant image scores ({floor:.3g}): "
                     f"{verdict}")
    return lines


def comparison_markdown(rows: dict[str, dict]) -> str:
    """The rows as one markdown table (every metric any row has, in columns' order), with the flags' legend."""
    from utils.evaluation.columns import DISTRIBUTION, DIVERSITY, PAIRED, column

    shown = [m for m in (*PAIRED, *DISTRIBUTION, *DIVERSITY) if any(m in r for r in rows.values())]
    marks = flags(rows)
    lines = ["| Row | " + " | ".join(column(m) for m in shown) + " |", "|---|" + "---|" * len(shown)]
    for name, row in rows.items():
        cells = []
        for m in shown:
            value = row.get(m, {}).get("value")
            cells.append("–" if value is None else f"{value:.4g}{marks.get(name, {}).get(m, '')}")
        lines.append(f"| {ROW_LABELS[name]} | " + " | ".join(cells) + " |")
    k = next((r[m]["k"] for r in rows.values() for m in DIVERSITY if m in r), None)
    n = next((r[m]["n"] for r in rows.values() for m in DISTRIBUTION if "n" in r.get(m, {})), None)
    lines += ["", f"{FLAG_AVERAGING} better than a perfect sampler (the oracle) on a paired metric, the 95% "
              "bootstrap interval over masks of the per-mask difference excluding 0: only averaging gets there. "
              f"{FLAG_COLLAPSE} less diverse than the oracle, by the same test.",
              "Paired metrics (one image against the real image of its mask, all samples) reward a blurred "
              f"average: compare the mean-of-K row. Diversity: among the {k or 'K'} samples of each mask. "
              f"Distribution metrics: {n or 'N'} images per row, one per mask of the same masks (the first sample, "
              "the mean of K, the first oracle image, the real image), against the training split; the real row "
              "is the floor at that N. The constant row (paired metrics only) is a flat image at the training "
              "split's mean intensity: samples that do not beat it on SSIM or PSNR learned nothing, unless the "
              "oracle does not beat it either. FRD v0 ranked "
              "blur and averaging behind the samples on the quickstart model, v1 did not (README, 'Which FRD to "
              "believe'). FRD of identical sets: about 0 (v0), -inf (v1, "
              "a log; shown as –)."]
    return "\n".join(lines)
