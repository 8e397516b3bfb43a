"""Vector stores for dense retrieval: FAISS (embedded default) and Milvus (Lite or cluster)."""
