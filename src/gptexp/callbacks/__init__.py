"""Lightning callbacks that measure and record what a run does; each is selected in conf/callbacks/."""

from gptexp.callbacks.history import RunHistory
from gptexp.callbacks.memory import MemoryMonitor
from gptexp.callbacks.resume import ResumePoint, ResumeState
from gptexp.callbacks.samples import TextSamples
from gptexp.callbacks.throughput import Throughput
from gptexp.callbacks.timing import PhaseTimer

__all__ = ["MemoryMonitor", "PhaseTimer", "ResumePoint", "ResumeState", "RunHistory", "TextSamples", "Throughput"]
