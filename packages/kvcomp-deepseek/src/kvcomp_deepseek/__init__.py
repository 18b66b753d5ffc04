"""kvcomp adapter for DeepSeek-V2 / V3 / R1 (MLA)."""

__version__ = "0.1.0"
