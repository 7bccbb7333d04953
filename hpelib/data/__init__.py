"""Datasets: rendered SynthHeads scenes (`synth`) and readers of the real published layouts (`real`)."""

from hpelib.data.real import read_300wlp, read_aflw2000, read_biwi  # noqa: F401
