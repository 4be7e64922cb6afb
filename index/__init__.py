"""The retrieval index: exact-match LMatch index and FAISS kNN-LM index."""
