"""Process and backend settings: the process flags (glibc malloc tunables,
XLA:CPU dot kernels), which backend takes the XLA:CPU workarounds, and the
CPU-only bfloat16 dots that the models' Dense layers take through flax's
injection points."""
