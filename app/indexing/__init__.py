"""Index stage: Ray orchestration of the LMatch and kNN builds, and evaluation with each index."""
