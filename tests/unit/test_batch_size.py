import weakref

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.runtime.batch_size import (
    auto_batch_size,
    cuda_probe,
    eager_module,
    is_out_of_memory,
    largest_fitting,
    reserve_bytes,
)
from gptforge.runtime.device import Precision, resolve_precision

CPU = Precision(torch.device("cpu"), torch.float32)


def memory_limit(max_batch):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= max_batch

    return fits, tried


def tiny_gpt(**overrides):
    from gptforge.model import GPT, ModelConfig

    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 16,
                              "block_size": 8, **overrides}))


class FakeOutOfMemory:
    """An objective that holds a tensor in its frame and runs out of memory above ``max_batch``,
    as a real forward does: the tensor is then reachable only through the traceback."""

    def __init__(self, max_batch, error=None):
        self.max_batch, self.error = max_batch, error
        self.held = []

    def __call__(self, model, batch):
        x, _ = batch
        activations = torch.zeros(x.shape[0], 1000)
        self.held.append(weakref.ref(activations))
        if x.shape[0] > self.max_batch:
            raise self.error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")
        return model(x).float().mean() + activations.sum(), x.numel()


def test_search_doubles_until_memory_runs_out():
    fits, tried = memory_limit(40)
    assert largest_fitting(fits, limit=1000) == 32
    assert tried == [1, 2, 4, 8, 16, 32, 64]
    assert largest_fitting(memory_limit(0)[0], limit=8) == 0
    assert largest_fitting(memory_limit(100)[0], limit=8) == 8  # never above what is needed


def test_micro_batch_divides_the_global_batch():
    fits, tried = memory_limit(40)
    # 48 sequences per process are wanted: 32 fits, 48 (untried by doubling) does not, so 24.
    assert auto_batch_size(fits, global_batch_tokens=48 * 128, block_size=128, world_size=1) == 24
    assert tried == [1, 2, 4, 8, 16, 32, 48]
    fits, tried = memory_limit(64)
    assert auto_batch_size(fits, global_batch_tokens=64 * 128 * 2, block_size=128,
                           world_size=2) == 64
    assert tried == [1, 2, 4, 8, 16, 32, 64]  # powers of two: no extra probe


def test_a_divisor_between_powers_of_two_is_tried():
    fits, tried = memory_limit(50)
    assert auto_batch_size(fits, 48 * 128, 128, 1) == 48  # one micro-batch instead of two of 24
    fits, tried = memory_limit(100)
    assert auto_batch_size(fits, 96 * 128, 128, 1) == 96
    assert tried == [1, 2, 4, 8, 16, 32, 64, 96]


def test_ranks_agree_on_the_smallest_answer():
    # Another rank fits 16 sequences (not 32) and, later, not the 24 tried between 16 and 32.
    theirs = iter([16, 0])

    def agree(mine):
        return min(mine, next(theirs))

    fits, tried = memory_limit(40)
    assert auto_batch_size(fits, 48 * 128, 128, 1, agree=agree) == 16
    assert tried[-1] == 24  # every rank probed the same extra size


def test_auto_batch_errors_are_actionable():
    fits, _ = memory_limit(40)
    with pytest.raises(GptforgeError, match="needs train.global_batch_tokens"):
        auto_batch_size(fits, 0, 128, 1)
    with pytest.raises(GptforgeError, match="not even one sequence fits"):
        auto_batch_size(memory_limit(0)[0], 1024, 128, 1)
    with pytest.raises(GptforgeError, match="must be a multiple"):
        auto_batch_size(fits, 1000, 128, 1)


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_a_failed_probe_frees_its_tensors():
    objective = FakeOutOfMemory(max_batch=4)
    fits = cuda_probe(tiny_gpt(), objective, CPU, block_size=8, vocab_size=64)
    assert fits(4) and not fits(8)
    # The activations of the failed try were reachable only from the exception's traceback.
    assert all(ref() is None for ref in objective.held)


def test_other_errors_are_not_taken_for_memory():
    objective = FakeOutOfMemory(max_batch=1, error=RuntimeError("expected scalar type Long"))
    fits = cuda_probe(tiny_gpt(), objective, CPU, block_size=8, vocab_size=64)
    with pytest.raises(RuntimeError, match="scalar type"):
        fits(2)
    objective.error = RuntimeError("CUDA error: out of memory")  # outside the caching allocator
    assert not fits(2)


def test_a_probe_leaves_the_model_and_random_state_as_they_were():
    from gptforge.train.objectives import LanguageModeling

    model = tiny_gpt(dropout=0.1)  # dropout draws random numbers in every probe
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fits = cuda_probe(model, LanguageModeling(), CPU, block_size=8, vocab_size=64)
    assert fits(2) and fits(4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_eager_module_inside_compile_is_probed():
    from gptforge.train.objectives import LanguageModeling

    model = tiny_gpt()

    class Compiled(torch.nn.Module):  # stands for torch.compile's OptimizedModule
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, *args, **kwargs):
            raise AssertionError("the probe must not run the compiled model")

    fits = cuda_probe(Compiled(model), LanguageModeling(), CPU, block_size=8, vocab_size=64)
    assert fits(2)
    assert eager_module(torch.compile(model)) == (model, False)  # the real wrapper (lazy)


def test_reserve_covers_optimizer_state_ddp_buckets_and_margin():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))
    model[1].requires_grad_(False)  # frozen: no optimizer state, no gradient
    trainable = 110 * 4
    assert reserve_bytes(model, data_parallel=False, total_memory=0, margin=0.1) == 2 * trainable
    assert reserve_bytes(model, data_parallel=True, total_memory=1000, margin=0.1) \
        == 3 * trainable + 100


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_is_unwrapped_and_still_trains_afterwards(one_process_group):
    from torch.nn.parallel import DistributedDataParallel

    from gptforge.train.objectives import LanguageModeling

    model = tiny_gpt()
    ddp = DistributedDataParallel(model)
    fits = cuda_probe(ddp, LanguageModeling(), CPU, block_size=8, vocab_size=64)
    assert fits(4)
    # The probe ran the plain module; DDP's reducer was left waiting for nothing.
    x = torch.randint(0, 64, (2, 8))
    loss, _ = LanguageModeling()(ddp, (x, x))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_an_fsdp_sharded_model_is_refused(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gptforge.train.objectives import LanguageModeling

    model = tiny_gpt()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))  # CPU even where CUDA is present
    with pytest.raises(GptforgeError, match="already sharded with FSDP"):
        cuda_probe(model, LanguageModeling(), CPU, block_size=8, vocab_size=64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_batch_size_on_a_real_gpu():
    from gptforge.train.objectives import LanguageModeling

    precision = resolve_precision(torch.device("cuda"), "auto")
    model = tiny_gpt(vocab_size=256, n_layer=2, n_embd=64, block_size=128).cuda()
    probe = cuda_probe(model, LanguageModeling(), precision, 128, 256)
    cuda_rng = torch.cuda.get_rng_state()
    assert auto_batch_size(probe, 64 * 128, 128, 1) == 64
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert all(p.grad is None for p in model.parameters())
    # Most of what the probes took is back with the driver.
    assert torch.cuda.memory_reserved() < 2 * torch.cuda.memory_allocated() + 64 * 2**20
