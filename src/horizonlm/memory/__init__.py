"""Memory stores for the retrieval memory at scale (exact torch, FAISS) and their persistence."""
