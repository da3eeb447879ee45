"""Lightning's checkpoint writers, over gptexp.weights.checkpoints: every checkpoint written atomically and read
weights-only."""

from __future__ import annotations

from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO

from gptexp.weights.checkpoints import load, save_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic, with clear errors for unusable files."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load(path, map_location=map_location or "cpu")


class ForwardingCheckpointIO(CheckpointIO):
    """A checkpoint writer that hands everything to `inner`; subclasses add to save_checkpoint."""

    def __init__(self, inner: CheckpointIO):
        self.inner = inner

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path, map_location=None, **kwargs):
        return self.inner.load_checkpoint(path, map_location=map_location, **kwargs)

    def remove_checkpoint(self, path):
        self.inner.remove_checkpoint(path)

    def teardown(self):
        self.inner.teardown()
