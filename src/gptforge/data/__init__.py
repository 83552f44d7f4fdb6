"""The data path: source files -> documents -> token shards in a prepared data directory.

:mod:`~gptforge.data.sources` reads documents, :mod:`~gptforge.data.prepare` tokenizes them into
shards (:mod:`~gptforge.data.shards`) with a manifest, :mod:`~gptforge.data.corpora` fetches the
built-in corpora, and :mod:`~gptforge.data.loader` serves the shards to training as batches.
``docs/data.md`` describes the formats.
"""
