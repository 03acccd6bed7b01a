"""Triton kernels, one per module, each beside a PyTorch reference of the same computation.

Importing a kernel module needs ``triton``; the rest of CortexFlow never imports this package
unless the ``triton`` backend is asked for. Under ``TRITON_INTERPRET=1`` the kernels run on CPU
tensors (tests); otherwise they need a CUDA GPU.
"""
