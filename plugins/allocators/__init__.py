"""Allocators that decide ranks (and bits, and placement) while the adapter trains, each exported as plain LoRA."""

from autopeft_plugins.allocators.bayesian_lora import BayesianLoRA, DiffoRA, IncreLoRA, LoRASqueeze, SoRA, autopeft_variants

__all__ = ["BayesianLoRA", "DiffoRA", "IncreLoRA", "LoRASqueeze", "SoRA", "autopeft_variants"]
