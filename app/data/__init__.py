"""Data stage: corpus tokenizing (Ray Data), tokenizers, the shard format and the training loader."""
