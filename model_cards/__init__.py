"""Jinja templates for the model cards hf_sam writes (shipped as the package hf_sam.model_cards)."""
