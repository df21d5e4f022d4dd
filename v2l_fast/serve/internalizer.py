"""Videos → adapters inside the server: `Internalizer` (an unfolded VLM and its hypernetwork,
one internalization at a time) and `unfolded_copy`, the twin of a VLM that stays unfolded when
a folding `Engine` serves the original.

Apart from the app (`server`): it is the one part of the server that runs the model's
internalization, and it needs nothing of HTTP.
"""

from __future__ import annotations

import copy
import itertools
import threading

from v2l_fast.adapters.core import Adapters
from v2l_fast.adapters.fold import folded_bias_of
from v2l_fast.errors import fail
from v2l_fast.vlm.load import VLM

__all__ = ["Internalizer", "unfolded_copy"]


def unfolded_copy(vlm: VLM) -> VLM:
    """A twin of ``vlm`` for internalization beside a folding `Engine`: every parameter and
    buffer is shared except the ``down_proj`` weights, which are copied.

    The engine folds the hypernetwork's bias block into ``down_proj`` in place, but the
    hypernetwork reads the layer states of the model it was trained on, the unfolded one. Make
    the twin BEFORE building the engine; it costs one copy of the ``down_proj`` weights.
    """
    from v2l_fast.vlm.lora_patch import down_proj_targets

    model = vlm.model
    if folded_bias_of(model) is not None:
        fail("vlm", "an unfolded model (make the twin before the Engine folds it)", "a folded model")
    copied = {id(module.weight) for module in down_proj_targets(model)}
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if id(t) not in copied}
    return VLM(copy.deepcopy(model, memo), vlm.tokenizer, vlm.preprocessor)


class Internalizer:
    """Video files → one adapter each, for the server: an unfolded VLM and its hypernetwork.

    Calls are serialised by a lock (one model forward at a time); the server runs them in
    worker threads. ``vlm`` must not be the model a folding engine serves (see `unfolded_copy`).
    """

    def __init__(self, vlm: VLM, hypernet):
        if not isinstance(vlm, VLM):
            fail("vlm", "a VLM", type(vlm).__name__)
        self.vlm, self.hypernet = vlm, hypernet
        self.lock = threading.Lock()

    @property
    def max_frames(self) -> int:
        """Frames the VLM's preprocessor samples from a video by default."""
        return self.vlm.preprocessor.max_frames

    def __call__(self, path: str, max_frames: int | None = None) -> tuple[Adapters, int]:
        """Internalize the video file ``path`` (``max_frames`` sampled frames; None: the
        preprocessor's); return its adapter and the frames used. Bad videos raise ValueError."""
        from v2l_fast.api import internalize
        from v2l_fast.vlm.video import read_video

        with self.lock:
            if folded_bias_of(self.vlm.model) is not None:
                raise RuntimeError("the internalizer's VLM holds a folded bias block: give the server an "
                                   "unfolded twin (v2l_fast.serve.internalizer.unfolded_copy) made before the Engine")
            video = read_video(path, max_frames=max_frames or self.max_frames, target_fps=self.vlm.preprocessor.fps)
            adapters = internalize([video], vlm=self.vlm, hypernet=self.hypernet)
        return adapters, len(video.timestamps)
