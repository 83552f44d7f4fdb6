"""SFT and preference batches: masks, padding, packing, resume, ranks; packed rows = alone."""

from __future__ import annotations

import pytest
import torch

from gptforge.data.finetune_loader import (
    PreferenceLoader,
    RowOrder,
    SFTLoader,
    encode_preference_examples,
    encode_sft_examples,
    pack_rows,
)
from gptforge.errors import GptforgeError
from gptforge.model import GPT, ModelConfig
from gptforge.model.loss import IGNORE_INDEX
from gptforge.tokenizer import train_tokenizer

PAD = 1


def example(k: int, length: int, prompt: int = 3) -> tuple[list[int], list[bool]]:
    """Example k: ids 100k, 100k+1, ... (so each id names its example); the first ``prompt``
    tokens are not learned."""
    ids = [100 * k + i for i in range(length)]
    return ids, [i >= prompt for i in range(length)]


EXAMPLES = [example(k, 5 + (3 * k) % 9) for k in range(1, 21)]  # lengths 5..13


def owner(token: int) -> int:
    return token // 100


def test_padded_rows_shift_mask_and_pad():
    loader = SFTLoader(EXAMPLES, block_size=16, batch_size=4, seed=0, pad_id=PAD)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        ids, mask = EXAMPLES[owner(int(row_x[0])) - 1]
        n = len(ids) - 1
        assert row_x[:n].tolist() == ids[:-1] and (row_x[n:] == PAD).all()
        assert row_y[:n].tolist() == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        assert (row_y[n:] == IGNORE_INDEX).all()
    assert loader.windows_per_epoch == len(EXAMPLES) and loader.truncated == 0


def test_long_examples_are_truncated_and_counted():
    long_learnable = example(1, 30, prompt=3)
    long_prompt = example(2, 30, prompt=25)  # its answer lies past the cut: nothing to learn
    loader = SFTLoader([long_learnable, long_prompt, example(3, 6)], block_size=8, batch_size=1,
                       seed=0, pad_id=PAD)
    assert loader.truncated == 2 and loader.dropped == 1 and loader.windows_per_epoch == 2
    rows = [loader.next_batch() for _ in range(2)]
    x, y = next(r for r in rows if owner(int(r[0][0, 0])) == 1)
    assert x[0].tolist() == long_learnable[0][:8] and y[0].tolist() == [
        IGNORE_INDEX, IGNORE_INDEX, *long_learnable[0][3:9]]
    with pytest.raises(GptforgeError, match="no fine-tuning examples left"):
        SFTLoader([long_prompt], block_size=8, batch_size=1, seed=0, pad_id=PAD)


def test_packing_keeps_examples_whole_and_numbers_segments():
    loader = SFTLoader(EXAMPLES, block_size=24, batch_size=1, seed=0, pad_id=PAD, packing=True)
    seen = []
    for _ in range(loader.windows_per_epoch):
        x, y, segments = loader.next_batch()
        assert x.shape == y.shape == segments.shape == (1, 24)
        for row_x, row_y, row_s in zip(x, y, segments):
            n_segments = int(row_s.max()) + 1
            for s in range(n_segments):
                cols = (row_s == s).nonzero().flatten()
                assert (cols == torch.arange(int(cols[0]), int(cols[-1]) + 1)).all()  # contiguous
                tokens = row_x[cols].tolist()
                if tokens[0] == PAD:  # the padding segment comes last
                    assert s == n_segments - 1 and (row_y[cols] == IGNORE_INDEX).all()
                    continue
                ids, mask = EXAMPLES[owner(tokens[0]) - 1]
                assert tokens == ids[:-1]  # the whole example, never split
                assert row_y[cols].tolist() == [t if m else IGNORE_INDEX
                                                for t, m in zip(ids[1:], mask[1:])]
                seen.append(owner(tokens[0]))
    assert sorted(seen) == list(range(1, 21))  # an epoch shows every example once
    assert loader.windows_per_epoch < len(EXAMPLES)


def test_pack_rows_starts_a_new_row_when_the_next_does_not_fit():
    assert pack_rows([5, 5, 6, 10, 1, 12], 16) == [[0, 1, 2], [3, 4], [5]]
    assert pack_rows([20, 3], 16) == [[0], [1]]  # (already truncated in practice)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_mid_epoch_gives_the_same_batches(packing):
    def make():
        return SFTLoader(EXAMPLES, block_size=24, batch_size=3, seed=5, pad_id=PAD,
                         packing=packing)

    a = make()
    for _ in range(7):  # past the end of the first epoch in both modes
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(9)]
    b = make()
    b.load_state_dict(state)
    for want in expected:
        for got_t, want_t in zip(b.next_batch(), want, strict=True):
            assert torch.equal(got_t, want_t)
    assert b.state_dict() == a.state_dict() and a.state_dict()["epoch"] >= 1


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_split_each_global_batch_disjointly(packing):
    kw = dict(block_size=24, seed=2, pad_id=PAD, packing=packing)
    single = SFTLoader(EXAMPLES, batch_size=4, **kw)
    ranks = [SFTLoader(EXAMPLES, batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()[0]
        parts = [loader.next_batch()[0] for loader in ranks]
        assert torch.equal(parts[0], whole[:2]) and torch.equal(parts[1], whole[2:])


def test_tiny_dataset_runs_into_the_next_epoch():
    loader = SFTLoader(EXAMPLES[:3], block_size=16, batch_size=5, seed=0, pad_id=PAD)
    firsts = [owner(int(t)) for t in loader.next_batch()[0][:, 0]]
    assert sorted(firsts[:3]) == [1, 2, 3] and loader.state_dict()["epoch"] == 1


def test_row_order_is_a_permutation_each_epoch_and_resumes_exactly():
    order = RowOrder(11, seed=4)
    for epoch in range(3):
        assert sorted(order.take(11)) == list(range(11)) and order.epoch == epoch
    a = RowOrder(11, seed=4)
    for _ in range(3):  # the third take does not fit in epoch 0: starts epoch 1
        a.take(4)
    state = a.state_dict()
    assert state == {"epoch": 1, "position": 4, "seed": 4, "rows": 11}  # what checkpoints hold
    want = [a.take(3) for _ in range(20)]  # crosses more epoch boundaries
    b = RowOrder(11, seed=0)
    b.take(2)
    b.load_state_dict(state)  # the seed comes from the state too
    assert [b.take(3) for _ in range(20)] == want


def test_row_order_never_changes():
    """Checkpoints hold only (seed, epoch, position): a new order would resume to other rows."""
    order = RowOrder(10, seed=0)
    assert order.take(10) == [4, 1, 7, 5, 3, 9, 0, 8, 6, 2]
    assert order.take(10) == [5, 6, 1, 2, 0, 8, 9, 3, 7, 4]


def test_preference_loader_pairs_chosen_with_rejected():
    pairs = [(*example(k, 6), *example(k + 50, 9)) for k in range(1, 9)]
    loader = PreferenceLoader(pairs, block_size=12, batch_size=4, seed=1, pad_id=PAD)
    cx, cy, rx, ry = loader.next_batch()
    assert all(t.shape == (4, 12) for t in (cx, cy, rx, ry))
    assert [owner(int(t)) + 50 for t in cx[:, 0]] == [owner(int(t)) for t in rx[:, 0]]
    assert (cx[:, 5:] == PAD).all() and (cy[:, 5:] == IGNORE_INDEX).all()
    assert (rx[:, 8:] == PAD).all() and (ry[:, :2] == IGNORE_INDEX).all()
    state = loader.state_dict()
    want = loader.next_batch()
    loader.next_batch()
    loader.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), want))


@pytest.fixture(scope="module")
def char_tokenizer():
    return train_tokenizer("char", ["Hi there! How are you? Fine, thanks. Be brief."])


def test_encoded_conversations_learn_only_the_answers(char_tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hi there!"}]
    [(ids, mask)] = encode_sft_examples(char_tokenizer, [conversation])
    loader = SFTLoader([(ids, mask)], block_size=64, batch_size=1, seed=0, pad_id=PAD)
    x, y = loader.next_batch()
    learned = [int(t) for t in y[0] if t != IGNORE_INDEX]
    assert char_tokenizer.decode(learned) == "Hi there!<|end|>"
    assert char_tokenizer.decode([int(t) for t in x[0] if t != PAD]) == (
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hi there!")


def test_preference_masks_cover_only_the_answer(char_tokenizer):
    record = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"},
                         {"role": "user", "content": "How are you?"}],
              "chosen": [{"role": "assistant", "content": "Fine, thanks."}],
              "rejected": [{"role": "assistant", "content": "Be brief."}]}
    [(c_ids, c_mask, r_ids, r_mask)] = encode_preference_examples(char_tokenizer, [record])
    decode = char_tokenizer.decode
    assert decode([t for t, m in zip(c_ids, c_mask) if m]) == "Fine, thanks.<|end|>"
    assert decode([t for t, m in zip(r_ids, r_mask) if m]) == "Be brief.<|end|>"
    assert decode(c_ids).startswith("<|user|>Hi<|end|><|assistant|>Hi<|end|><|user|>How")


def test_encoding_errors_name_the_conversation(char_tokenizer):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine"}]
    bad = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Qué"}]
    with pytest.raises(GptforgeError, match=r"conversation 1 .*'Q'"):
        encode_sft_examples(char_tokenizer, [good, bad])


GPT2 = {}
LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_kv_head=2, bias=False,
             tie_embeddings=False)


@pytest.mark.parametrize("arch", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_packed_logits_equal_each_example_alone(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_embd=32, block_size=24, **arch)
    model = GPT(cfg).eval()
    examples = [([int(t) for t in torch.randint(2, 64, (n,))], [True] * n) for n in (9, 6, 12, 5)]
    loader = SFTLoader(examples, block_size=24, batch_size=3, seed=0, pad_id=PAD, packing=True)
    x, _, segments = loader.next_batch()
    with torch.no_grad():
        packed = model(x, segment_ids=segments)
        checked = 0
        for b in range(x.size(0)):
            for s in segments[b].unique():
                cols = (segments[b] == s).nonzero().flatten()
                alone = model(x[b:b + 1, cols])[0]
                torch.testing.assert_close(packed[b, cols], alone, atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked >= 5  # several examples and padding segments were compared
    # Without segment_ids a packed row is one long sequence: the examples would see each other.
    with torch.no_grad():
        assert not torch.allclose(model(x), packed, atol=1e-3)
