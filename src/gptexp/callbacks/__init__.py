"""Lightning callbacks that measure and record what a run does; each is selected in conf/callbacks/."""

from gptexp.callbacks.memory import MemoryMonitor
from gptexp.callbacks.resume import GracefulStop, PeriodicCheckpoint, ResumeState
from gptexp.callbacks.samples import TextSamples
from gptexp.callbacks.throughput import Throughput
from gptexp.callbacks.timing import PhaseTimer

__all__ = ["GracefulStop", "MemoryMonitor", "PeriodicCheckpoint", "PhaseTimer", "ResumeState", "TextSamples",
           "Throughput"]
