"""Lightning callbacks that measure and record what a run does; each is selected in conf/callbacks/."""

from gptexp.training.callbacks.history import RunHistory
from gptexp.training.callbacks.memory import MemoryMonitor
from gptexp.training.callbacks.resume import BestAndLast, ResumePoint, ResumeState
from gptexp.training.callbacks.samples import TextSamples
from gptexp.training.callbacks.throughput import Throughput
from gptexp.training.callbacks.timing import PhaseTimer

__all__ = ["BestAndLast", "MemoryMonitor", "PhaseTimer", "ResumePoint", "ResumeState", "RunHistory", "TextSamples",
           "Throughput"]
