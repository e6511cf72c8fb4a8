"""The names of the reported metrics, their order, direction, label and unit: one table for evaluate.py's report,
the comparison rows and the studies (no heavy imports, so a report can be written without torch)."""

METRICS = ("fid", "ssim", "kid", "cmmd", "psnr", "b_dice", "hd95", "surface_dice")  # the paper's order, then ours
METRICS_3D = ("fid_3d", "fid_2p5d", "mmd", "ms_ssim", "ssim", "psnr", "b_dice", "hd95", "surface_dice")
PAIRED = ("ssim", "ms_ssim", "psnr", "b_dice", "hd95", "surface_dice")  # one image against its mask's real image
# set against the reference set: needs no weights (FRD, PRDC in radiomic space) or Inception's (the _inception ones)
DISTRIBUTION = ("frd_v0", "frd_v1", "precision", "recall", "density", "coverage",
                "precision_inception", "recall_inception", "density_inception", "coverage_inception")
DIVERSITY = ("pairwise_dissimilarity", "pixel_std")  # among the K samples of one mask
COMPARED = DISTRIBUTION + DIVERSITY  # the samples' values of the comparison's columns, after the paired table's

HIGHER_IS_BETTER = {"fid": False, "ssim": True, "kid": False, "cmmd": False, "psnr": True, "b_dice": True,
                    "hd95": False, "surface_dice": True, "fid_3d": False, "fid_2p5d": False, "mmd": False,
                    "ms_ssim": True, "frd_v0": False, "frd_v1": False, "precision": True, "recall": True,
                    "density": True, "coverage": True, "precision_inception": True, "recall_inception": True,
                    "density_inception": True, "coverage_inception": True,
                    # diversity has no better direction on its own: it should match the real data's (the oracle)
                    "pairwise_dissimilarity": True, "pixel_std": True, "mask_dice": True}
LABELS = {"b_dice": "B-Dice", "surface_dice": "NSD", "fid_3d": "3D-FID", "fid_2p5d": "2.5D-FID", "ms_ssim": "MS-SSIM",
          "frd_v0": "FRDv0", "frd_v1": "FRDv1", "precision": "Prec", "recall": "Rec", "density": "Dens",
          "coverage": "Cov", "precision_inception": "Prec(Inc)", "recall_inception": "Rec(Inc)",
          "density_inception": "Dens(Inc)", "coverage_inception": "Cov(Inc)", "pairwise_dissimilarity": "1-SSIM(K)",
          "pixel_std": "pixel std(K)", "mask_dice": "mask Dice"}
UNITS = {"psnr": "dB", "hd95": "px"}


def label(metric: str) -> str:
    return LABELS.get(metric, metric.upper())


def column(metric: str) -> str:
    """A table header: the label and the arrow of the better direction; ≈ for diversity, which should match the
    real data's (the oracle's), neither more nor less."""
    if metric in DIVERSITY:
        return f"{label(metric)}≈"
    return f"{label(metric)}{'↑' if HIGHER_IS_BETTER[metric] else '↓'}"
