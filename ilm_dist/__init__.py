"""ilm_dist: distributed MoCo v2 pretraining with intermediate-layer losses (Kaku et al., NeurIPS 2021)."""

__version__ = "0.1.0"
