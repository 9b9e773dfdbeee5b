"""The hf_eu version, recorded in every saved composite."""

__version__ = "0.1.0"
