"""Evaluation of pretrained encoders (kNN, probing, fine-tuning, feature reuse)."""
