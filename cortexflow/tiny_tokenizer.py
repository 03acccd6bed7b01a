"""A tiny PaliGemma-style SentencePiece tokenizer, trained in process (demo checkpoints, tests).

Like PaliGemma's it has pad 0, eos 1, bos 2, unk 3, byte fallback (any text encodes), split digits and a
``"\\n"`` piece; its 320 ids match the vocabulary of :func:`cortexflow.random_checkpoint.tiny_model_config`.
Nothing is downloaded.
"""

from __future__ import annotations

import io
from pathlib import Path

TINY_TOKENIZER_SENTENCES = (
    "pick up the red block and place it in the bowl",
    "open the top drawer and put the sponge inside",
    "close the gripper slowly",
    "put the cup on the plate",
    "Task: stack the blocks, State: 0 12 128 255 -1;",
    "Action: move the arm to the left",
    "0 1 2 3 4 5 6 7 8 9 10 64 100 200 255",
)
TINY_VOCAB_SIZE = 320


def tiny_tokenizer_bytes(vocab_size: int = TINY_VOCAB_SIZE) -> bytes:
    """The serialized SentencePiece model (a ``tokenizer.model`` file's bytes) with ``vocab_size`` pieces."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_TOKENIZER_SENTENCES * 10),
        model_writer=model,
        vocab_size=vocab_size,
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
    return model.getvalue()


def write_tiny_tokenizer(path: str | Path, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Write the tiny tokenizer to ``path`` (a ``tokenizer.model`` file); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_tokenizer_bytes(vocab_size))
    return path
