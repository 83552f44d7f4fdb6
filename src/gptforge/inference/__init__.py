"""Generation: KV cache, sampling (pure functions), the token-id engine, and text generation."""
