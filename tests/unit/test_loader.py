import numpy as np
import pytest

from gptforge.data.loader import BatchLoader, TokenStream
from gptforge.errors import GptforgeError


def shards(n=1000, parts=3):
    tokens = np.arange(n, dtype=np.uint16)
    return [tokens[i * n // parts:(i + 1) * n // parts] for i in range(parts)]


def test_windows_cross_shard_boundaries_correctly():
    stream = TokenStream(shards())
    assert stream.window(320, 40).tolist() == list(range(320, 360))
    assert stream.window(0, 1000).tolist() == list(range(1000))


def test_targets_are_inputs_shifted_by_one():
    loader = BatchLoader(shards(), block_size=16, batch_size=4, seed=0)
    x, y = loader.next_batch()
    assert x.shape == (4, 16)
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()


def test_resume_from_state_continues_identically():
    a = BatchLoader(shards(), block_size=16, batch_size=4, seed=3)
    for _ in range(30):  # crosses an epoch boundary (62 windows per epoch)
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(20)]
    b = BatchLoader(shards(), block_size=16, batch_size=4, seed=3)
    b.load_state_dict(state)
    for want in expected:
        assert (b.next_batch()[0] == want).all()


def test_an_epoch_visits_each_window_once_and_ranks_are_disjoint():
    ranks = [BatchLoader(shards(), block_size=10, batch_size=3, seed=1, rank=r, world_size=2,
                         shuffle_offset=False) for r in range(2)]
    seen = [set(), set()]
    for _ in range(ranks[0].windows_per_epoch // 6):
        for r, loader in enumerate(ranks):
            seen[r].update(int(row[0]) for row in loader.next_batch()[0])
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == ranks[0].windows_per_epoch // 6 * 6


def test_split_shorter_than_block_is_a_clear_error():
    with pytest.raises(GptforgeError, match="val split has 10 tokens.*block_size"):
        BatchLoader([np.arange(10, dtype=np.uint16)], block_size=16, batch_size=2, seed=0,
                    split="val")
