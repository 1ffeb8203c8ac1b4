"""Reference generators built from fastgen's layers (fused=True) or from the plain torch layers
(fused=False), with the same parameter and buffer names, so that one state dict loads into both."""

from fastgen.models.dcgan import Autoencoder, DCGANDiscriminator, DCGANGenerator
from fastgen.models.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
from fastgen.models.vae import VAE

__all__ = ["Autoencoder", "DCGANDiscriminator", "DCGANGenerator", "StyleGAN2Discriminator", "StyleGAN2Generator", "VAE"]
