"""Shared pytest fixtures.

CI has no GPU: Triton kernels run in Triton's CPU interpreter, which must be switched on before any
``@triton.jit`` function is first launched.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Triton reads TRITON_INTERPRET when a @triton.jit function is created: import every kernel now, so
    # a test that switches the interpreter off (to check the no-GPU error) cannot be the first importer.
    try:
        import importlib
        import pkgutil

        import cortexflow.kernels

        for _module in pkgutil.iter_modules(cortexflow.kernels.__path__):
            importlib.import_module(f"cortexflow.kernels.{_module.name}")
    except ImportError:  # no triton: the kernel tests fail with their own message
        pass


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """Path of a tiny SentencePiece ``tokenizer.model`` trained in process (pad 0, eos 1, bos 2, unk 3).

    Like PaliGemma's it has byte fallback (any text encodes), splits digits and has a "\\n" piece.
    """
    from cortexflow.tiny_tokenizer import write_tiny_tokenizer

    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer.model")
