"""Hugging Face conversion: per-family config and weight maps, and the generic export / load."""

from models.hf.export import FAMILIES, export_hf, load_hf

__all__ = ["FAMILIES", "export_hf", "load_hf"]
