import numpy as np
import pytest

from gptforge.data.loader import BatchLoader, TokenStream, WindowOrder
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


def test_window_order_is_a_permutation_each_epoch_and_resumes_exactly():
    stream = TokenStream(shards(1003))
    order = WindowOrder(stream, block_size=16, seed=7, shuffle_offset=True)
    offsets = set()
    for epoch in range(4):
        n = order.items_per_epoch
        starts = order.take(n)
        offset = min(starts)
        assert order.epoch == epoch and offset < 16 and offset + 16 * n + 1 <= stream.n_tokens
        assert sorted(starts) == [offset + 16 * k for k in range(n)]  # every window once
        offsets.add(offset)
    assert len(offsets) > 1  # the grid moves between epochs

    a = WindowOrder(stream, block_size=16, seed=7, shuffle_offset=True)
    a.take(50)
    a.take(20)  # does not fit in epoch 0: starts epoch 1
    state = a.state_dict()
    assert state == {"epoch": 1, "position": 20, "seed": 7}  # what checkpoints hold
    want = [a.take(9) for _ in range(30)]  # crosses more epoch boundaries
    b = WindowOrder(stream, block_size=16, seed=0, shuffle_offset=True)
    b.take(5)
    b.load_state_dict(state)  # the seed comes from the state too
    assert [b.take(9) for _ in range(30)] == want


def test_window_order_never_changes():
    """Checkpoints hold only (seed, epoch, position): a new order would resume to other data."""
    order = WindowOrder(TokenStream(shards()), block_size=16, seed=3, shuffle_offset=True)
    assert order.take(6) == [848, 32, 288, 432, 240, 144]
    order.seek(1, 0)
    assert order.take(6) == [99, 371, 691, 883, 819, 35]


def test_split_shorter_than_block_is_a_clear_error():
    with pytest.raises(GptforgeError, match="val split has 10 tokens.*block_size"):
        BatchLoader([np.arange(10, dtype=np.uint16)], block_size=16, batch_size=2, seed=0,
                    split="val")


def mixture(weights, seed=0, rank=0, world_size=1, batch_size=8):
    from gptforge.data.loader import MixtureLoader

    # Source d holds tokens d*100000 + i, so every window tells where it came from.
    sources = [[np.arange(d * 100_000, d * 100_000 + 5000, dtype=np.uint32)]
               for d in range(len(weights))]
    return MixtureLoader(sources, weights, block_size=8, batch_size=batch_size, seed=seed,
                         rank=rank, world_size=world_size)


def test_mixture_follows_its_weights():
    loader = mixture([0.7, 0.2, 0.1])
    origins = np.concatenate([loader.next_batch()[0][:, 0].numpy() // 100_000
                              for _ in range(500)])
    freq = np.bincount(origins, minlength=3) / len(origins)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.02)
    assert loader.rows_per_source == np.bincount(origins, minlength=3).tolist()


def test_mixture_resumes_exactly_and_ranks_are_disjoint():
    a = mixture([0.5, 0.5], seed=4)
    for _ in range(30):
        a.next_batch()
    state = a.state_dict()
    want = [a.next_batch()[0] for _ in range(10)]
    b = mixture([0.5, 0.5], seed=4)
    b.load_state_dict(state)
    assert all((b.next_batch()[0] == w).all() for w in want)

    ranks = [mixture([0.6, 0.4], seed=1, rank=r, world_size=2, batch_size=4) for r in range(2)]
    single = mixture([0.6, 0.4], seed=1, batch_size=8)
    for _ in range(20):
        r0, r1 = (loader.next_batch()[0] for loader in ranks)
        whole = single.next_batch()[0]
        assert (r0 == whole[:4]).all() and (r1 == whole[4:]).all()


def test_mixture_spec_parsing():
    from gptforge.data.loader import parse_mixture

    assert parse_mixture("data/web:3, data/code:1") == [("data/web", 0.75), ("data/code", 0.25)]
    with pytest.raises(GptforgeError, match="DIR:WEIGHT"):
        parse_mixture("data/web")
    with pytest.raises(GptforgeError, match="positive weight"):
        parse_mixture("data/web:0")
    for weight in ("nan", "inf", "-inf"):  # float() accepts them; no finite share follows
        with pytest.raises(GptforgeError, match=f"'data/web:{weight}' must look like DIR:WEIGHT"):
            parse_mixture(f"data/web:{weight},data/code:1")


def test_a_batch_larger_than_the_split_still_moves_through_epochs():
    loader = BatchLoader([np.arange(50, dtype=np.uint16)], block_size=8, batch_size=8, seed=0,
                         shuffle_offset=False)  # 6 windows, 8 per batch
    loader.next_batch()
    assert loader.order.epoch == 1 and loader.order.position == 2
    x, _ = loader.next_batch()
    assert len({int(r[0]) for r in x[:4]}) == 4  # the rest of epoch 1: distinct windows


def test_ids_outside_the_vocabulary_name_their_shard(tmp_path):
    from gptforge.data.loader import MixtureLoader
    from gptforge.data.shards import read_shard, write_shard

    first, second = tmp_path / "shard_000000.bin", tmp_path / "shard_000001.bin"
    write_shard(first, np.arange(100, dtype=np.uint16) % 50)
    write_shard(second, np.array([3, 57, 4] + [5] * 97, dtype=np.uint16))  # 57: out of 50
    shards = [read_shard(first), read_shard(second)]
    stream = TokenStream(shards, vocab_size=50)
    assert stream.window(0, 100).max() == 49  # within the first shard: fine
    with pytest.raises(GptforgeError, match=rf"^{second}: token id 57 \(at token 1\) is outside "
                                            r"the vocabulary of 50 tokens; .*gptforge prepare"):
        stream.window(90, 20)  # a window across the shard boundary
    assert TokenStream(shards).window(90, 20).max() == 57  # without a vocabulary: no check
    loader = MixtureLoader([[shards[0]], shards], [0.5, 0.5], 9, 8, seed=0, vocab_size=50)
    with pytest.raises(GptforgeError, match="token id 57"):
        for _ in range(20):  # every window of the second source is drawn by then
            loader.next_batch()


def _global_batches(make, world_size: int, accum: int, steps: int) -> list[list[int]]:
    """The first token of every window of each step's global batch, in (micro, rank) order."""
    loaders = [make(r, world_size) for r in range(world_size)]
    out = []
    for _ in range(steps):
        per_rank = [loader.next_batches(accum) for loader in loaders]
        out.append([int(row[0]) for m in range(accum) for r in range(world_size)
                    for row in per_rank[r][m][0]])
    return out


@pytest.mark.parametrize("kind", ["windows", "mixture"])
def test_the_global_batch_does_not_depend_on_the_layout(kind):
    """1 process x accum 2 x B8, 2 ranks x accum 1 x B8 and 1 x accum 1 x B16 see the same
    windows in the same order every step, epoch boundaries included (60 windows per epoch)."""
    def maker(batch_size):
        if kind == "mixture":
            return lambda r, w: mixture([0.6, 0.4], seed=2, rank=r, world_size=w,
                                        batch_size=batch_size)
        return lambda r, w: BatchLoader(shards(), block_size=16, batch_size=batch_size, seed=5,
                                        rank=r, world_size=w)

    accum2 = _global_batches(maker(8), world_size=1, accum=2, steps=9)
    ranks2 = _global_batches(maker(8), world_size=2, accum=1, steps=9)
    wide = _global_batches(maker(16), world_size=1, accum=1, steps=9)
    assert accum2 == ranks2 == wide
    assert len({tuple(b) for b in wide}) == 9  # the steps differ: the check is not vacuous
