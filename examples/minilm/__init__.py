"""all-MiniLM-L6-v2 sentence embeddings, float against every mono-quant preset."""
