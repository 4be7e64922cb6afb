"""Speed-ups applied to a plain model from outside: converters, Triton kernels, whole-step CUDA graphs."""
