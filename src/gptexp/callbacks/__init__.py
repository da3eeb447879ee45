"""Lightning callbacks that record what a run does; each is selected in conf/callbacks/."""

from gptexp.callbacks.samples import TextSamples

__all__ = ["TextSamples"]
