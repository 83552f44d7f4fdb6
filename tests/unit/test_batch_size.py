import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.runtime.batch_size import auto_batch_size, largest_fitting


def memory_limit(max_batch):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= max_batch

    return fits, tried


def test_search_doubles_until_memory_runs_out():
    fits, tried = memory_limit(40)
    assert largest_fitting(fits, limit=1000) == 32
    assert tried == [1, 2, 4, 8, 16, 32, 64]
    assert largest_fitting(memory_limit(0)[0], limit=8) == 0
    assert largest_fitting(memory_limit(100)[0], limit=8) == 8  # never above what is needed


def test_micro_batch_divides_the_global_batch():
    fits, _ = memory_limit(40)
    # 48 sequences per process are wanted: 32 fits but does not divide 48, so 24 is used.
    assert auto_batch_size(fits, global_batch_tokens=48 * 128, block_size=128, world_size=1) == 24
    assert auto_batch_size(fits, global_batch_tokens=64 * 128 * 2, block_size=128,
                           world_size=2) == 32


def test_auto_batch_errors_are_actionable():
    fits, _ = memory_limit(40)
    with pytest.raises(GptforgeError, match="needs train.global_batch_tokens"):
        auto_batch_size(fits, 0, 128, 1)
    with pytest.raises(GptforgeError, match="not even one sequence fits"):
        auto_batch_size(memory_limit(0)[0], 1024, 128, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_batch_size_on_a_real_gpu():
    from gptforge.model import GPT, ModelConfig
    from gptforge.runtime.batch_size import cuda_probe
    from gptforge.runtime.device import resolve_precision
    from gptforge.train.objectives import LanguageModeling

    precision = resolve_precision(torch.device("cuda"), "auto")
    model = GPT(ModelConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=64,
                            block_size=128)).cuda()
    probe = cuda_probe(model, LanguageModeling(), precision, 128, 256)
    assert auto_batch_size(probe, 64 * 128, 128, 1) == 64
