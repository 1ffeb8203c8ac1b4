"""Triton kernels of fastgen (installed as fastgen.kernels). Only @triton.jit code lives here; the
host launchers sit in the op files under fastgen/ops/."""
