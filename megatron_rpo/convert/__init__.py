"""Checkpoint conversion between Hugging Face and Megatron (declarative name map, TP/PP-agnostic files)."""

from megatron_rpo.convert.files import ConvertedCheckpoint
from megatron_rpo.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_rpo.convert.load import load_converted
from megatron_rpo.convert.megatron_to_hf import convert_megatron_to_hf

__all__ = ["ConvertedCheckpoint", "convert_hf_to_megatron", "convert_megatron_to_hf", "load_converted"]
