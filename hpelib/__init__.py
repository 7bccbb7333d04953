"""hpelib: the library behind the HPE-CogVLM research workbook (see DESIGN.md)."""

__version__ = "0.1.0"
