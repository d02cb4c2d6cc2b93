"""Process and backend settings: glibc malloc tunables, XLA:CPU dot kernels, CPU-only kernels."""
