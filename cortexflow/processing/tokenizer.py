"""Prompt tokenisation for Pi0 / Pi0.5 (openpi ``PaligemmaTokenizer`` semantics).

Pi0: ``BOS + clean(prompt) + "\\n"``. Pi0.5 with discrete state:
``BOS + "Task: {clean(prompt)}, State: {s_1 s_2 ...};\\nAction: "`` where ``s_i`` are the 256-bin indices of
the normalised, unpadded state. Both are right-padded with id 0 to ``max_len`` and come with a bool mask
that is True on real tokens.
"""

import importlib
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cortexflow.errors import CortexFlowWarning, InputError, TokenizerError

PAD_ID = 0
STATE_BINS = 256


class PromptTokenizer:
    """A text -> token-id encoder backed by a SentencePiece model or a Hugging Face ``tokenizer.json``."""

    def __init__(
        self,
        encode_fn: Callable[[str], list[int]],
        decode_fn: Callable[[list[int]], str],
        bos_id: int,
        vocab_size: int,
        source: str,
    ) -> None:
        """Wrap ``encode_fn`` (text -> ids, never adding special tokens) and ``decode_fn`` (ids -> text)."""
        self._encode_fn = encode_fn
        self._decode_fn = decode_fn
        self._bos_id = bos_id
        self._vocab_size = vocab_size
        self.source = source

    @classmethod
    def from_path(cls, path) -> "PromptTokenizer":
        """Load a tokenizer.model or tokenizer.json file, or a folder holding one (tokenizer.model first)."""
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.model", "tokenizer.json"):
                if (path / name).is_file():
                    return cls.from_path(path / name)
            raise TokenizerError(
                f"no tokenizer found in folder {path}; "
                "expected tokenizer.model (SentencePiece) or tokenizer.json in it"
            )
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer path {path} does not exist; expected a tokenizer.model or tokenizer.json file "
                "or a folder holding one"
            )
        if path.suffix == ".json":
            return cls.from_tokenizer_json(path)
        return cls.from_sentencepiece(path)

    @classmethod
    def from_sentencepiece(cls, path) -> "PromptTokenizer":
        """Load a SentencePiece model file (for example the PaliGemma ``tokenizer.model``)."""
        spm = _import_optional("sentencepiece")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(
                f"cannot load SentencePiece model {path}: {exc}; expected a valid tokenizer.model file"
            ) from exc
        bos_id = processor.bos_id()
        if bos_id < 0:
            raise TokenizerError(
                f"SentencePiece model {path} has no BOS token; expected one (PaliGemma's is id 2)"
            )
        return cls(processor.encode, processor.decode, bos_id, processor.vocab_size(), str(path))

    @classmethod
    def from_tokenizer_json(cls, path) -> "PromptTokenizer":
        """Load a Hugging Face ``tokenizer.json``; BOS is the id of the token ``"<bos>"``."""
        tokenizers = _import_optional("tokenizers")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(
                f"cannot load tokenizer {path}: {exc}; expected a valid tokenizer.json"
            ) from exc
        bos_id = tokenizer.token_to_id("<bos>")
        if bos_id is None:
            raise TokenizerError(
                f"tokenizer {path} has no '<bos>' token; expected a Gemma/PaliGemma tokenizer.json"
            )

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False).ids

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        return cls(encode, decode, bos_id, tokenizer.get_vocab_size(), str(path))

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token."""
        return self._bos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce."""
        return self._vocab_size

    def encode(self, text: str, add_bos: bool) -> list[int]:
        """Token ids of ``text``, preceded by BOS when ``add_bos``; no other special tokens are added."""
        ids = list(self._encode_fn(text))
        return [self._bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        """Text of token ids (special tokens such as BOS and padding are dropped)."""
        return self._decode_fn([int(i) for i in ids])


def _import_optional(module: str):
    """Import ``module`` or raise a TokenizerError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TokenizerError(
            f"the {module!r} package is needed to load this tokenizer but is not installed; "
            f"pip install {module}"
        ) from exc


def clean_prompt(text: str) -> str:
    """openpi prompt cleaning: strip surrounding whitespace, replace ``_`` and newlines by spaces."""
    return text.strip().replace("_", " ").replace("\n", " ")


def tokenize_pi0_prompt(
    tokenizer: PromptTokenizer, prompt: str, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pi0 prompt tokens ``BOS + clean(prompt) + "\\n"``.

    Returns (ids int64 ``(max_len,)``, mask bool ``(max_len,)``), right-padded with id 0.
    """
    cleaned = clean_prompt(_check_prompt(prompt))
    tokens = tokenizer.encode(cleaned, add_bos=True) + tokenizer.encode("\n", add_bos=False)
    return _pad_tokens(tokens, max_len)


def tokenize_joined_newline_prompt(
    tokenizer: PromptTokenizer, prompt: str, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """LeRobot's Pi0 prompt tokens ``BOS + prompt + "\n"``: the prompt as given (no cleaning), with ``"\n"``
    appended unless it already ends with one, tokenised as one string.

    Returns (ids int64 ``(max_len,)``, mask bool ``(max_len,)``), right-padded with id 0.
    """
    text = _check_prompt(prompt)
    text = text if text.endswith("\n") else text + "\n"
    return _pad_tokens(tokenizer.encode(text, add_bos=True), max_len)


def discretize_state(normalized_state: np.ndarray) -> np.ndarray:
    """256-bin indices (int64) of normalised state values: ``digitize(x, linspace(-1, 1, 257)[:-1]) - 1``.

    Values below -1 give -1 and values at or above 1 give 255, as in openpi.
    """
    state = np.asarray(normalized_state, dtype=np.float64)
    if not np.isfinite(state).all():
        raise InputError(f"normalized state {state.tolist()} contains NaN or inf; expected finite numbers")
    bins = np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]
    return (np.digitize(state, bins) - 1).astype(np.int64)


def tokenize_pi05_prompt(
    tokenizer: PromptTokenizer, prompt: str, normalized_state: np.ndarray | None, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pi0.5 prompt tokens as (ids int64 ``(max_len,)``, mask bool ``(max_len,)``).

    With a 1-D normalised (unpadded) state: ``BOS + "Task: {clean}, State: {bins};\\nAction: "``. Without
    a state (checkpoints with ``discrete_state_input=False``) the Pi0 format is used.
    """
    if normalized_state is None:
        return tokenize_pi0_prompt(tokenizer, prompt, max_len)
    state = np.asarray(normalized_state)
    if state.ndim != 1:
        raise InputError(f"normalized state has shape {state.shape}; expected a 1-D vector (D,)")
    cleaned = clean_prompt(_check_prompt(prompt))
    state_text = " ".join(str(v) for v in discretize_state(state))
    text = f"Task: {cleaned}, State: {state_text};\nAction: "
    return _pad_tokens(tokenizer.encode(text, add_bos=True), max_len)


def tokenize_ids(prompt_tokens, max_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate user-supplied 1-D token ids in ``[0, vocab_size)`` and pad/truncate them to ``max_len``.

    Returns (ids int64 ``(max_len,)``, mask bool ``(max_len,)``); no BOS is added.
    """
    if isinstance(prompt_tokens, torch.Tensor):
        prompt_tokens = prompt_tokens.detach().cpu().numpy()
    try:
        ids = np.asarray(prompt_tokens)
    except (TypeError, ValueError) as err:
        raise InputError(f"prompt_tokens must be a 1-D list of token ids: {str(err)[:120]}") from None
    if ids.ndim != 1 or ids.size == 0:
        raise InputError(f"prompt_tokens have shape {ids.shape}; expected a non-empty 1-D list of token ids")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"prompt_tokens have dtype {ids.dtype}; expected integer token ids")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise InputError(
            f"prompt_tokens contain ids {sorted(set(bad.tolist()))[:10]} outside the vocabulary; "
            f"expected ids in [0, {vocab_size})"
        )
    return _pad_tokens(ids.astype(np.int64).tolist(), max_len)


def _check_prompt(prompt) -> str:
    """Return ``prompt`` if it is a string, else raise an InputError."""
    if not isinstance(prompt, str):
        raise InputError(f"task prompt is of type {type(prompt).__name__}; expected a string")
    return prompt


def _pad_tokens(tokens: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ``tokens`` with PAD_ID (or truncate with a warning) to ``max_len``; return (ids, mask)."""
    if len(tokens) > max_len:
        warnings.warn(
            f"prompt is {len(tokens)} tokens long but the limit is {max_len}; truncated to {max_len} tokens",
            CortexFlowWarning,
            stacklevel=3,
        )
        tokens = tokens[:max_len]
    ids = np.full(max_len, PAD_ID, dtype=np.int64)
    ids[: len(tokens)] = tokens
    mask = np.zeros(max_len, dtype=np.bool_)
    mask[: len(tokens)] = True
    return ids, mask
