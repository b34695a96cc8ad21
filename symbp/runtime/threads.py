"""Threads for the array helpers: ``set_threads`` and ``_in_parts``.

Contract: ``_in_parts(work, out)`` calls ``work(part)`` for slices that cut ``out``'s first axis
into parts, on the threads ``set_threads(count)`` asked for (1 by default: all in the calling
thread), and the results are the same bits whatever the count. ``work`` writes only into
``out[part]`` and must not itself call ``_in_parts``. ``set_threads`` is the one public name of
the runtime: a generated module that copies ``_in_parts`` copies it too, as part of its interface.
"""

import concurrent.futures

_PARTS = {"threads": 1, "pool": None}  # set by set_threads
_PART_SIZE = 2**20  # elements: smaller parts are not worth a thread (measured: see docs/conv.md)


def set_threads(count):
    """Run the array helpers (window copies, col2im, pooling, padding) on count threads.

    Their work is cut along the batch axis into count parts, and the results are the same bits
    whatever the count; 1, the default, keeps it all in the calling thread. More pays off when
    the BLAS library's threads sleep while idle: OpenBLAS's spin for a while after each matrix
    product (OPENBLAS_THREAD_TIMEOUT=4, set before NumPy loads, makes them sleep almost at once).
    The BLAS threads themselves, one per core by default, are not set here: on a busy machine
    one can be many times faster (OPENBLAS_NUM_THREADS=1 before NumPy loads, or threadpoolctl's
    threadpool_limits(1, "blas")).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"set_threads needs a positive int, not {count!r}")
    old = _PARTS["pool"]
    pool = concurrent.futures.ThreadPoolExecutor(count - 1) if count > 1 else None
    _PARTS.update(threads=count, pool=pool)
    if old is not None:
        old.shutdown()


def _in_parts(work, out):
    """work(part) for slices that cut out's first axis into parts, one thread each.

    At most one part per _PART_SIZE elements. The calling thread runs the first part; work
    must not itself call _in_parts (its pool could then wait on itself).
    """
    count = min(_PARTS["threads"], len(out) if out.ndim else 1, out.size // _PART_SIZE)
    pool = _PARTS["pool"]
    if count < 2 or pool is None:
        work(slice(None))
        return
    parts = [slice(len(out) * k // count, len(out) * (k + 1) // count) for k in range(count)]
    futures = [pool.submit(work, part) for part in parts[1:]]
    try:
        work(parts[0])
    finally:
        concurrent.futures.wait(futures)
    for future in futures:
        future.result()
