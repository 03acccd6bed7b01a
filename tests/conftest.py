"""Shared pytest fixtures.

CI has no GPU: Triton kernels run in Triton's CPU interpreter, which must be switched on before any
``@triton.jit`` function is first launched.
"""

import io
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

TINY_TOKENIZER_SENTENCES = [
    "pick up the red block and place it in the bowl",
    "open the top drawer and put the sponge inside",
    "close the gripper slowly",
    "put the cup on the plate",
    "Task: stack the blocks, State: 0 12 128 255 -1;",
    "Action: move the arm to the left",
    "0 1 2 3 4 5 6 7 8 9 10 64 100 200 255",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """Path of a tiny SentencePiece ``tokenizer.model`` trained in process (pad 0, eos 1, bos 2, unk 3).

    Like PaliGemma's it has byte fallback (any text encodes), splits digits and has a "\\n" piece.
    """
    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_TOKENIZER_SENTENCES * 10),
        model_writer=model,
        vocab_size=320,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        user_defined_symbols=["\n"],
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path
