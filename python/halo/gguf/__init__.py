"""GGUF, llama.cpp's model format: the file reader and writer and ggml's tensor types
(``reader``), export of a Hugging Face model (+ adapter) to GGUF (``export``), import back to a
Hugging Face folder (``importer``), the architecture and tokenizer tables they share (``arch``,
``vocab``, ``check``), running an exported file through llama.cpp (``run``) and the
``halo export-gguf`` / ``import-gguf`` commands (``cli``). Mirrors ``include/halo/gguf``.
"""

from .export import export_gguf
from .importer import import_gguf
from .reader import GGUFFile, GGUFTensor, GGUFWriter, block_size, dequantize, quantize, read, type_info

__all__ = [
    "GGUFFile",
    "GGUFTensor",
    "GGUFWriter",
    "block_size",
    "dequantize",
    "export_gguf",
    "import_gguf",
    "quantize",
    "read",
    "type_info",
]
