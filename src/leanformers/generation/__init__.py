"""Text generation: static KV cache, samplers, the decode loop, stopping and streaming."""
