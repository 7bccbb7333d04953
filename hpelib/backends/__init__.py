"""VLM backends behind one small protocol (`base.Backend`): the embedded `tiny` one and hub models."""

from hpelib.backends.base import Backend, Sample, get_backend_class

__all__ = ["Backend", "Sample", "get_backend_class"]
