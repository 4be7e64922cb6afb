"""spotlm: GPT-style language models with a retrieval index, trained and served on Ray."""
