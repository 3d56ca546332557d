"""synth: labelled synthetic image datasets from diffusion models, on Ray."""

__version__ = "0.1.0"
