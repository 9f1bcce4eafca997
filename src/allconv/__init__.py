"""allconv: Springenberg et al. (2014), "Striving for Simplicity: The All Convolutional Net"."""

__version__ = "0.1.0"
