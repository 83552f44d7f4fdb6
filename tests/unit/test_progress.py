"""The training progress bar: evaluation and saving do not count as training time."""

import io

import pytest
from tqdm import tqdm

from gptforge.train.loop import leave_out_of_eta


def test_a_pause_left_out_of_the_progress_bar_keeps_its_eta():
    """10 steps of 1 s, then 100 s of evaluation: the ETA of the 90 steps left stays ~90 s."""
    def eta(shift: bool) -> float:
        clock = [0.0]
        bar = tqdm(total=100, file=io.StringIO(), mininterval=0, miniters=1, smoothing=0)
        bar._time = lambda: clock[0]
        bar.start_t = bar.last_print_t = 0.0
        for _ in range(10):
            clock[0] += 1.0
            bar.update(1)
        clock[0] += 100.0  # evaluation and a checkpoint
        if shift:
            leave_out_of_eta(bar, 100.0)
        clock[0] += 1.0
        bar.update(1)
        info = bar.format_dict
        bar.close()
        rate = info["rate"] or info["n"] / info["elapsed"]  # smoothing=0: the mean rate
        return (info["total"] - info["n"]) / rate

    assert eta(shift=True) == pytest.approx(89.0, rel=0.01)
    assert eta(shift=False) > 800  # what users saw: the ETA jumped tenfold
