"""The ControlNet diffusion baseline: DDPM training on the UNet + ControlNet, DDIM/DDPM sampling."""
