"""SPADE (Park et al. 2019), the GAN baseline, on MONAI's SPADENet."""
