"""Triton kernels and their launchers.  Imported lazily by lct_kernels.ops, so
that TRITON_INTERPRET=1 set after ``import lct_kernels`` still takes effect."""
