"""A stage of the pipeline run ahead in a thread: container decode and colour conversion, the
model's GPU work, and video encode or latent writes overlap instead of taking turns."""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Iterable, Iterator

from . import interrupt

PREFETCH = 2  # items a background stage may run ahead of its consumer (bounds memory)


def background(items: Iterable, depth: int = PREFETCH) -> Iterator:
    """Iterate `items` in a thread, up to `depth` ahead, so container decode and colour conversion,
    the model's GPU work, and mp4 encode/latent writes overlap instead of taking turns.

    The producer's exception is re-raised here, in the consumer, unchanged; a consumer that stops
    early (or fails, or is interrupted) stops the producer, closes its generator and waits for the
    thread, so no thread outlives its consumer. Close this generator (`contextlib.closing`) when
    not reading it to the end. depth 0 runs inline."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    break
            else:
                put((end, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((end, error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="cvae-background", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item, error = slots.get(timeout=0.1)
            except queue.Empty:
                interrupt.check()  # the producer may be busy for long: the consumer stops as asked
                continue
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # a second Ctrl-C must not leave the thread running at exit
            with contextlib.suppress(KeyboardInterrupt):
                thread.join()
