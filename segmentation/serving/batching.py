"""Cross-request decode batching: concurrent clicks on one picture share one decoder call.

A replica serving many users gets several clicks on the same picture at once (a team annotating one
image, a program sending many prompts). Each click's objects are independent rows of the decoder's
batch, so concurrent decodes on one picture are concatenated into one `Prompt`, decoded once, and
split back per request.

No timer: a decode that finds none running on its group runs at once (a lone click waits for
nothing); decodes arriving while one runs queue, and the next call takes all of them.

Exactness: the engine decodes each object with exactly its own tokens (objects are grouped by
token layout, never padded to another object's length), so an object's mask does not depend on the
other objects of its decode, and requests on one picture merge freely.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from ..engine import Decoded, Embedding, Segmenter
from ..prompts import Prompt


@dataclasses.dataclass
class _Pending:
    embedding: Embedding
    prompt: Prompt
    hq_token_only: bool
    future: Future = dataclasses.field(default_factory=Future)
    turn: threading.Event = dataclasses.field(default_factory=threading.Event)  # answered, or its turn to lead


class DecodeBatcher:
    """Runs `decode(embedding, prompt, hq_token_only)` for concurrent callers: one merged call per group
    (same picture and HQ setting) at a time.

    The caller that finds its group idle runs the call with everything queued, itself first; when it is
    done it hands the turn to the oldest request still queued (whose thread runs the next call), so no
    thread keeps working for others after its own answer is ready."""

    def __init__(self, decode: Callable[[Embedding, Prompt, bool], Decoded], max_objects: int = 255):
        self._decode = decode
        self.max_objects = max_objects
        self._lock = threading.Lock()
        self._queues: dict[Hashable, list[_Pending]] = {}  # a key is present while its group is busy
        self.calls = 0  # decoder calls made
        self.requests = 0  # requests answered

    def decode(self, embedding: Embedding, prompt: Prompt, hq_token_only: bool = False) -> Decoded:
        key = (embedding.key, hq_token_only)
        pending = _Pending(embedding, prompt, hq_token_only)
        with self._lock:
            busy = key in self._queues
            self._queues.setdefault(key, []).append(pending)
        if busy:
            pending.turn.wait()
        if not pending.future.done():  # our turn: we are first in the queue
            self._run(key, self._take(key))
        return pending.future.result()

    def waiting(self) -> int:
        """Requests queued behind a running decode of their group."""
        with self._lock:
            return sum(len(queue) for queue in self._queues.values())

    def _take(self, key: Hashable) -> list[_Pending]:
        """The oldest queued requests of `key` that fit one call (at least one)."""
        with self._lock:
            queue = self._queues[key]
            batch, objects = [], 0
            while queue and (not batch or objects + len(queue[0].prompt) <= self.max_objects):
                objects += len(queue[0].prompt)
                batch.append(queue.pop(0))
            return batch

    def _run(self, key: Hashable, batch: list[_Pending]) -> None:
        merged = Prompt(objects=tuple(obj for item in batch for obj in item.prompt.objects))
        try:
            decoded = self._decode(batch[0].embedding, merged, batch[0].hq_token_only)
        except BaseException as error:  # every request in the call gets the failure (e.g. out of memory → 503)
            for item in batch:
                item.future.set_exception(error)
        else:
            start = 0
            for item in batch:
                stop = start + len(item.prompt)
                item.future.set_result(split(decoded, item.prompt, start, stop))
                start = stop
        with self._lock:
            self.calls += 1
            self.requests += len(batch)
            queue = self._queues[key]
            if queue:
                queue[0].turn.set()  # the next call is that thread's
            else:
                del self._queues[key]
        for item in batch:
            item.turn.set()


def split(decoded: Decoded, prompt: Prompt, start: int, stop: int) -> Decoded:
    """The rows `start:stop` of a merged decode, as if `prompt` had been decoded alone."""
    return dataclasses.replace(
        decoded,
        prompt=prompt,
        logits=decoded.logits[start:stop],
        scores=decoded.scores[start:stop],
        counts=tuple(decoded.counts[start:stop]),
    )


class BatchingSegmenter(Segmenter):
    """A Segmenter whose decodes go through a `DecodeBatcher`: `segment()` and everything above it
    (service.segment: limits, parsing, resizing) are unchanged."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batcher = DecodeBatcher(
            lambda embedding, prompt, hq_token_only: Segmenter.decode(
                self, embedding, prompt, hq_token_only=hq_token_only
            )
        )

    @classmethod
    def wrapping(cls, segmenter: Segmenter) -> BatchingSegmenter:
        """The same loaded model, cache and limits (whatever precision `from_pretrained` chose)."""
        wrapped = cls(segmenter.loaded, segmenter.cache, segmenter.max_pixels)
        wrapped.onnx_decoder = segmenter.onnx_decoder  # the decoder backend `from_pretrained` chose
        return wrapped

    def decode(self, embedding: Embedding, prompt: Any, labels: Any = None, **options: Any) -> Decoded:
        if (
            options.get("reuse") is not None
            or not isinstance(prompt, Prompt)
            or set(options) - {"hq_token_only", "reuse"}
        ):
            return super().decode(embedding, prompt, labels, **options)  # not a plain click: decode alone
        self._check_model(embedding)
        return self.batcher.decode(embedding, prompt, bool(options.get("hq_token_only") and self.hq))
