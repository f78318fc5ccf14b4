"""Batches made ahead in a background thread, so the data loader overlaps the training step.

    stream = Prefetcher(build_stream(...), depth=2)     # or build_stream(..., prefetch=2)
    stream.load_state_dict(saved)                      # before iterating (or at any time: restarts)
    batch = next(stream)                               # made while the previous step ran
    saved = stream.state_dict()                        # the position after the batches *taken*

A daemon thread calls `next(stream)` and puts (batch, position after it) into a queue of at most
`depth` batches; when CUDA is in use (available and initialised, i.e. the trainer runs on a GPU)
the batch's tensors are copied into pinned memory there, so the host-to-device copy can be
asynchronous. Only the thread touches the wrapped stream
while it runs, and `state_dict()` is the position recorded with the last batch the consumer took,
never that of batches made ahead: a checkpoint resumes at exactly the next batch the trainer would
have trained on. An exception in the thread is raised again by the `next()` that would have
returned that batch (its traceback points into the producer). `close()` stops the thread (also
done when the Prefetcher is garbage collected); `load_state_dict` stops it, sets the wrapped
stream's position and lets the next `next()` start a fresh thread from there.

The work in the thread is numpy on small arrays and Python: it holds the GIL for part of each
batch, so it overlaps the GPU's work, not the trainer's own Python; keep the loader well ahead of
the step (bench/data.py measures it).
"""
from __future__ import annotations

import copy
import queue
import threading
import weakref

import torch

_END = object()  # the wrapped stream is exhausted
_POLL_S = 0.1  # how often a blocked producer checks for close()


class Prefetcher:
    """Iterator over `stream`'s batches, made up to `depth` batches ahead in a daemon thread."""

    def __init__(self, stream, depth: int = 2, pin_memory: bool | None = None):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"prefetch depth={depth!r} must be an integer >= 1 (batches made ahead; 0 = use the "
                             f"stream without a Prefetcher)")
        for attr in ("state_dict", "load_state_dict"):
            if not callable(getattr(stream, attr, None)):
                raise TypeError(f"Prefetcher needs a stream with {attr}() (a train.data DataStream), got "
                                f"{type(stream).__name__}")
        self.stream, self.depth = stream, depth
        self.pin_memory = pin_memory  # None: decided when the thread starts (see _start)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._state: dict | None = None  # position after the last batch taken (while a thread runs)
        self._error: BaseException | None = None  # raised again on every next() after the producer failed
        self._done = False
        self._finalizer = None

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._error is not None:
            raise self._error
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        kind, payload, state = self._queue.get()
        if kind is _END:
            self._done = True
            self._join()
            raise StopIteration
        if kind == "error":
            self._error = payload
            self._join()
            raise payload
        self._state = state
        return payload

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict:
        """The position after the last batch taken from this Prefetcher (not after those made ahead)."""
        if self._thread is None:  # nothing made ahead: the stream's own position
            return self.stream.state_dict()
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: stops the producer (dropping batches made ahead) first."""
        self.close()
        self.stream.load_state_dict(state)
        self._error, self._done = None, False

    # ------------------------------------------------------------------ thread
    def _start(self) -> None:
        self._state = self.stream.state_dict()  # no thread yet: safe to read
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        # pin when CUDA is in use: available *and* initialised by the trainer (a CPU run on a GPU host
        # should not create a CUDA context per process just to pin its batches)
        pin = self.pin_memory
        if pin is None:
            pin = torch.cuda.is_available() and torch.cuda.is_initialized()
        device = torch.cuda.current_device() if pin and torch.cuda.is_available() else None
        # the thread holds the stream, the queue and the event, never self: self stays collectable
        self._thread = threading.Thread(target=_produce, args=(self.stream, self._queue, self._stop, pin, device),
                                        name="archscale-prefetch", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._thread, self._queue, self._stop)

    def close(self) -> None:
        """Stop the producer thread (batches made ahead are dropped; the position stays that of the
        last batch taken, and the wrapped stream is set back to it)."""
        if self._thread is None:
            return
        state = self._state
        self._finalizer()  # = _shutdown: set the event, drain, join
        self._thread = self._queue = self._stop = self._finalizer = None
        self._state = None
        if state is not None:
            self.stream.load_state_dict(state)  # the stream ran ahead: put it back where the consumer is

    def _join(self) -> None:
        """The producer has finished (end or error): forget the thread, keep the position."""
        if self._thread is not None:
            self._thread.join()


def _produce(stream, q: queue.Queue, stop: threading.Event, pin: bool, device) -> None:
    """The producer thread: (batch, position after it) into q until the stream ends, fails, or stop."""
    if device is not None:
        torch.cuda.set_device(device)  # pinned buffers on this rank's device context, not device 0's
    while not stop.is_set():
        try:
            batch = next(stream)
            state = stream.state_dict()
            if pin:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            item = ("batch", batch, state)
        except StopIteration:
            item = (_END, None, None)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
            item = ("error", e, None)
        while True:
            try:
                q.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                if stop.is_set():
                    return
        if item[0] != "batch":
            return


def _shutdown(thread: threading.Thread, q: queue.Queue, stop: threading.Event) -> None:
    stop.set()
    while thread.is_alive():
        try:  # unblock a producer waiting on a full queue
            while True:
                q.get_nowait()
        except queue.Empty:
            pass
        thread.join(timeout=_POLL_S)
