"""Triton kernels, one per module, each beside a PyTorch reference of the same computation.

Importing a kernel module needs ``triton``; the rest of CortexFlow never imports this package
unless the ``triton`` backend is asked for. Under ``TRITON_INTERPRET=1`` the kernels run on CPU
tensors (tests); otherwise they need a CUDA GPU.
"""

#: The Triton release the kernels are tested with (the ``triton`` extra pins it; CUDA torch 2.13 ships it).
TESTED_TRITON_VERSION = "3.7.1"
#: What to run when Triton is missing.
TRITON_INSTALL_HINT = (f'pip install "cortexflow[triton]" (triton=={TESTED_TRITON_VERSION}, the version CortexFlow '
                       "is tested with; CUDA builds of torch 2.13 ship it)")
