"""Hugging Face checkpoints in and out: see convert.py (the table of architectures) and
hf_files.py (reading and writing HF folders)."""

from jaxlm.interop.convert import ARCHITECTURES, export_hf, import_hf, load_hf
from jaxlm.interop.hf_files import ConversionError

__all__ = ["ARCHITECTURES", "ConversionError", "export_hf", "import_hf", "load_hf"]
