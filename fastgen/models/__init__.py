"""Reference generators built from fastgen's layers (fused=True) or from the plain torch layers
(fused=False), with the same parameter and buffer names, so that one state dict loads into both."""

from fastgen.models.vae import VAE

__all__ = ["VAE"]
