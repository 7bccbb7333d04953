"""Datasets: rendered SynthHeads scenes (`synth`), readers of the real published layouts (`real`),
and the datasets of one run (`prepare`)."""

from hpelib.data.real import load_image, read_300wlp, read_aflw2000, read_biwi  # noqa: F401
