"""Med-DT-FM: flow matching with mask-conditioned bridges distilled from a frozen U-KAN segmenter."""
