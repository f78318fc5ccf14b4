"""The prefetching stream (train/data/prefetch.py): the same batches and positions as the stream
it wraps, a position that is that of the batches *taken* (checkpoints resume exactly), errors
raised in the consumer, and a thread that stops."""
import gc
import json
import time

import pytest
import torch

from test_data_golden import CASES, GOLDEN, case_stream, stream_digest  # noqa: E402  (tests/ is on sys.path)
from test_data_golden import corpora  # noqa: F401  (fixture)
from train.data import DataConfig, Prefetcher


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", ["cd_flm", "ed_mlm", "nd_ul2", "ed_prompted", "cd_plm_eval"])
@pytest.mark.parametrize("depth", [1, 3])
def test_prefetched_batches_and_positions_equal_the_pinned_stream(corpora, case, depth):  # noqa: F811
    s = case_stream(corpora, case, prefetch=depth)
    assert isinstance(s, Prefetcher)
    # the digest covers every batch and the state_dict after each: positions of batches taken
    assert stream_digest(s, CASES[case][-1]) == GOLDEN[case]


def test_state_after_k_batches_and_resume_equal_the_plain_stream(corpora):  # noqa: F811
    plain, pre = case_stream(corpora, "nd_plm"), case_stream(corpora, "nd_plm", prefetch=3)
    for k in range(7):
        assert _same(next(plain), next(pre))
        assert pre.state_dict() == plain.state_dict()
    time.sleep(0.2)  # let the thread run ahead: the position must still be that of batch 7
    assert pre.state_dict() == plain.state_dict()
    assert pre.stream.batches > plain.batches  # it did run ahead
    state = json.loads(json.dumps(pre.state_dict()))
    resumed = case_stream(corpora, "nd_plm", prefetch=2)
    resumed.load_state_dict(state)  # before iterating
    assert resumed.state_dict() == state
    for _ in range(8):
        assert _same(next(plain), next(resumed))
    # load_state_dict while the thread runs: it stops, the stream goes back, the next batch is right
    again = case_stream(corpora, "nd_plm")
    again.load_state_dict(state)
    want = [next(again) for _ in range(3)]
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert all(_same(w, next(resumed)) for w in want)
    resumed.close()
    assert resumed.stream.state_dict() == resumed.state_dict()  # the wrapped stream is put back too


class _Failing:
    """A stream that yields `ok` batches, then raises."""

    def __init__(self, ok):
        self.i, self.ok = 0, ok

    def __next__(self):
        if self.i >= self.ok:
            raise ValueError(f"bad document at batch {self.i}")
        self.i += 1
        return {"x": torch.tensor([self.i])}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_producer_errors_are_raised_in_the_consumer_after_the_good_batches():
    p = Prefetcher(_Failing(2), depth=4)
    assert [int(next(p)["x"]) for _ in range(2)] == [1, 2]
    with pytest.raises(ValueError, match="bad document at batch 2"):
        next(p)
    assert p.state_dict() == {"i": 2}  # the position of the last good batch taken
    with pytest.raises(ValueError, match="bad document"):  # and again, not a hang
        next(p)
    p.load_state_dict({"i": 0})  # a fresh start clears the error
    assert int(next(p)["x"]) == 1


def test_end_of_stream_and_threads_stop(corpora):  # noqa: F811
    ev = case_stream(corpora, "cd_plm_eval", prefetch=2)
    assert len(list(ev)) == 2 and not ev._thread.is_alive()  # the eval pass ends: its thread too
    with pytest.raises(StopIteration):
        next(ev)
    s = case_stream(corpora, "cd_flm", prefetch=2)
    next(s)
    thread = s._thread
    assert thread.is_alive()
    s.close()
    assert not thread.is_alive() and s._thread is None
    s2 = case_stream(corpora, "cd_flm", prefetch=1)
    next(s2)
    thread = s2._thread
    del s2  # dropped without close(): the finalizer stops the thread
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_bad_prefetch_values_are_one_line_errors(corpora):  # noqa: F811
    with pytest.raises(ValueError, match=r"^data\.prefetch=-1 must be an integer >= 0$"):
        DataConfig(prefetch=-1)
    with pytest.raises(ValueError, match=r"data\.prefetch='2' must be an integer"):
        DataConfig(prefetch="2")
    with pytest.raises(ValueError, match=r"prefetch=1\.5 must be an integer >= 0"):
        case_stream(corpora, "cd_flm", prefetch=1.5)
    with pytest.raises(ValueError, match=r"prefetch depth=0 must be an integer >= 1"):
        Prefetcher(case_stream(corpora, "cd_flm"), depth=0)
    with pytest.raises(TypeError, match="needs a stream with state_dict"):
        Prefetcher(iter([1, 2]), depth=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_batches_are_pinned_on_cuda_and_equal(corpora):  # noqa: F811
    torch.zeros(1, device="cuda")  # CUDA in use, as in the trainer
    plain, pre = case_stream(corpora, "ed_mlm"), case_stream(corpora, "ed_mlm", prefetch=2)
    for _ in range(4):
        a, b = next(plain), next(pre)
        assert _same(a, b) and all(v.is_pinned() for v in b.values())
    pre.close()
