"""Flow matching (COMET, MOTFM): mask-conditional rectified flow from a warm-start prior, with the contrastive term."""
