"""The evaluation's comparison rows: the samples beside what averaging and a perfect sampler would score.

Rows (each a set of images with the split index of the mask that conditioned each one):

- ``samples``: the generated images;
- ``mean_of_k``: per mask, the mean of its K samples (:mod:`utils.evaluation.diversity`): a blurred average,
  not an image, so a paired metric it wins is a paired metric that rewards averaging;
- ``oracle`` (phantom data only, :mod:`utils.data.oracle`): for every sample a second real image of its mask,
  the k-th sample of a mask matched by the phantom's k-th redraw: what a perfect sampler scores;
- ``real``: the split's real images themselves (distribution metrics only): the real-vs-real value of the
  reference.

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

ROWS = ("samples", "mean_of_k", "oracle", "real")
PRDC = ("precision", "recall", "density", "coverage")
ROW_LABELS = {"samples": "samples", "mean_of_k": "mean of K samples per mask (an average, not an image)",
              "oracle": "oracle: a second real image of each mask (a perfect sampler)",
              "real": "real images of the split (real vs reference)"}


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, 1, H, W] or [N, 1, D, H, W] float in [0, 1]
    indices: np.ndarray  # [N] split index of each image's mask
    paired: bool = True  # whether paired metrics against the mask's real image mean anything
    per_image: dict | None = None  # its paired metrics when already computed ({metric: [N]})
    cache_key: str | None = None  # real data (the same in every run of a study): features cached under this key


@dataclass
class Reference:
    """The distribution metrics' reference: raw radiomic features per FRD version (and Inception features)."""

    radiomic: dict[str, np.ndarray]
    inception: np.ndarray | None = None
    cache: object = None  # a FeatureCache for the rows with a cache_key, or None


def build_sets(images, indices, per_image: dict, real, oracle: torch.Tensor | None, grouped: dict
               ) -> dict[str, ImageSet]:
    """The rows' image sets; ``per_image``: the samples' paired metrics; ``oracle`` matches ``images`` one to
    one (None off phantom data); ``grouped``: :func:`utils.evaluation.diversity.groups` of ``indices`` ({}
    when no mask has 2 samples)."""
    from utils.evaluation.diversity import mean_of_samples

    indices = np.asarray(indices)
    sets = {"samples": ImageSet(images, indices, per_image=per_image)}
    if grouped:
        means, mean_indices = mean_of_samples(images, grouped)
        sets["mean_of_k"] = ImageSet(means, mean_indices)
    if oracle is not None:
        sets["oracle"] = ImageSet(oracle, indices, cache_key="oracle")
    sets["real"] = ImageSet(real, np.arange(len(real)), paired=False, cache_key="split")
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
                inception=None) -> dict[str, dict]:
    """{metric: {"value", ...}} of one row: paired metrics (mean over images, 95% cluster-bootstrap interval over
    masks), FRD per version, precision/recall/density/coverage, and per-mask diversity when K >= 2."""
    from utils.evaluation.diversity import groups, per_mask_diversity
    from utils.evaluation.metrics import summarise

    out: dict[str, dict] = {}
    if s.paired:
        idx = torch.as_tensor(s.indices)
        per_image = s.per_image or paired_fn(s.images, real[idx], masks[idx])
        for name, values in per_image.items():
            out[name] = _summary(summarise(values, s.indices, n_boot=n_boot, seed=0))
    out.update(distribution_metrics(s.images, reference, extractors, inception, s.cache_key))
    grouped = groups(s.indices)
    if grouped:
        k = len(next(iter(grouped.values())))
        for name, values in per_mask_diversity(s.images, grouped).items():
            out[name] = {**_summary(summarise(values, n_boot=n_boot, seed=0)), "k": k}
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
        feats, ref = features(extractor), reference.radiomic[version]
        out[f"frd_{version}"] = {"value": _finite(frechet_radiomics_distance(ref, feats, version)), **n}
        if k == 0 and min(n.values()) > PRDC_K:
            scores = prdc(*standardise(ref, feats))
            out.update({m: {"value": v, "space": f"radiomics {version}", **n} for m, v in scores.items()})
        elif k == 0:
            out.update({m: {"skipped": f"the k-NN balls (k = {PRDC_K}) need more than {PRDC_K} images per set, got "
                                       f"{n}"} for m in PRDC})
    if inception is not None and reference.inception is not None and min(n.values()) > PRDC_K:
        scores = prdc(reference.inception, features(inception))
        out.update({f"{m}_inception": {"value": v, "space": "inception", "n": len(images),
                                       "n_reference": len(reference.inception)} for m, v in scores.items()})
    return out


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _summary(s: dict) -> dict:
    finite = [None if v is None else _finite(v) for v in (s["mean"], s["ci95_lo"], s["ci95_hi"])]
    return {"value": finite[0], "n": s["n"], "n_masks": s["n_clusters"], "ci95": finite[1:]}


def compare(sets: dict[str, ImageSet], real, masks, reference: Reference, extractors: dict, paired_fn,
            n_boot: int, inception=None) -> dict[str, dict]:
    """{row: row_metrics} for every row of ``sets``, in :data:`ROWS` order."""
    rows = {}
    for name in ROWS:
        if name in sets:
            log.info("comparison row '%s': %d images", name, len(sets[name].images))
            rows[name] = row_metrics(sets[name], real, masks, reference, extractors, paired_fn, n_boot, inception)
    return rows


def evaluate_rows(images, indices, per_image: dict, real, masks, records: list[dict], reference_images,
                  synthetic: dict | None, paired_fn, n_boot: int, cache, inception=None) -> dict:
    """Everything the comparison reports for one evaluation: ``{"rows": {row: metrics}, "reference": ...,
    "oracle": "used" | why not}``. ``images``/``indices``/``per_image``: the samples, the split index of each
    one's mask and their paired metrics; ``real``/``masks``/``records``: the split; ``reference_images``: the
    training split (the distribution metrics' reference); ``synthetic``: ``data_args.synthetic`` (the oracle);
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
    sets = build_sets(images, indices, per_image, real, oracle, groups(indices))
    rows = compare(sets, real, masks, reference, extractors, paired_fn, n_boot, inception)
    return {"rows": rows, "oracle": oracle_note, "n_reference": len(reference_images)}


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


def flags(rows: dict[str, dict]) -> dict[str, dict[str, str]]:
    """{row: {metric: flag}} for the model rows (samples, mean of K) that beat the oracle on a paired metric
    (:data:`FLAG_AVERAGING`: above a perfect sampler, which only averaging achieves) or are less diverse than it
    (:data:`FLAG_COLLAPSE`); nothing without an oracle row."""
    from utils.evaluation.columns import DIVERSITY, HIGHER_IS_BETTER, PAIRED

    oracle = rows.get("oracle")
    out: dict[str, dict[str, str]] = {}
    for name in ("samples", "mean_of_k"):
        if oracle is None or name not in rows:
            continue
        out[name] = {}
        for metric, cell in rows[name].items():
            ref = oracle.get(metric, {}).get("value")
            value = cell.get("value")
            if ref is None or value is None:
                continue
            if metric in PAIRED and (value > ref if HIGHER_IS_BETTER[metric] else value < ref):
                out[name][metric] = FLAG_AVERAGING
            elif metric in DIVERSITY and value < ref:
                out[name][metric] = FLAG_COLLAPSE
    return out


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
    lines += ["", f"{FLAG_AVERAGING} above a perfect sampler (the oracle) on a paired metric: averaging, not "
              f"fidelity. {FLAG_COLLAPSE} less diverse than the oracle.",
              "Paired metrics reward a blurred average (the mean-of-K row); the distribution metrics (FRD, "
              "precision/recall/density/coverage against the reference set) and the diversity among the "
              f"{k or 'K'} samples of a mask do not. "
              "FRD is about 0 (v0) or very negative (v1, a log) for identical sets; the real row is the "
              "reference's own real-vs-real value, the floor a model can reach with this many images."]
    return "\n".join(lines)
