"""Checkpoints, in one place: how a model is saved, found, loaded, resumed and exported.

- ``format.py``: the checkpoint directory (``model.safetensors``, ``model.json``, ``tokenizer/``,
  ``trainer_state.pt``), written atomically; the ``latest`` pointer; fingerprints.
- ``state.py``: model and optimizer state keyed by parameter name, full (gathered to rank 0) or
  sharded (each rank writes its part with ``torch.distributed.checkpoint``).
- ``checkpointer.py``: the :class:`~gptforge.checkpoints.checkpointer.Checkpointer` the training
  loop owns: save a step, restore one, prune, keep the ``best`` pointer.
- ``loading.py``: a usable model from any checkpoint, LoRA adapters on a verified base included.
- ``export.py``: a self-contained copy of a checkpoint, in gptforge's own layout or another:
  ``huggingface.py`` (the ``transformers`` layout).

Nothing else in gptforge reads or writes checkpoint files.
"""
