"""Inputs of the token-decoding policies (OpenVLA, RT-2 style): one camera image and a prompt as ids.

OpenVLA's image processor (``docs/reference_facts.md#F-OV-2``): the RGB image is resized to exactly 224 x 224 (``resize-naive``,
by Pillow's bicubic filter, as the processor's ``TVF.resize`` of a PIL image does), scaled to [0, 1] and
normalised twice, with ImageNet statistics for DINOv2 (channels 0-2) and with mean = std = 0.5 for SigLIP
(channels 3-5). A 224 x 224 input is not resampled. Prompts are tokenised with the checkpoint's SentencePiece model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cortexflow.errors import InputError, TokenizerError
from cortexflow.processing.resample import resize_uint8_pil
from cortexflow.processing.tokenizer import _import_optional

DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SPACE_PIECE = "\u2581"


def image_as_uint8(image: Any) -> np.ndarray:
    """One HWC RGB image as uint8: a PIL image, a uint8 array/tensor, or a float one in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size") and not isinstance(image, (np.ndarray, torch.Tensor)):
        image = np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()
    if not isinstance(image, np.ndarray):
        raise InputError(f"image is of type {type(image).__name__}; expected an HWC RGB numpy array, "
                         "torch tensor or PIL image")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " It looks like CHW; transpose it to HWC." if image.ndim == 3 and image.shape[0] == 3 else ""
        raise InputError(f"image has shape {image.shape}; expected one HWC RGB image (H, W, 3).{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"image is empty (shape {image.shape}); expected H > 0 and W > 0")
    if image.dtype == np.uint8:
        return image
    if image.dtype not in (np.float16, np.float32, np.float64):
        raise InputError(f"image has dtype {image.dtype}; expected uint8 in [0, 255] or float in [0, 1]")
    if not np.isfinite(image).all():
        raise InputError("image contains NaN or inf; expected finite values in [0, 1]")
    low, high = float(image.min()), float(image.max())
    if low < -1e-3 or high > 1.0 + 1e-3:
        raise InputError(f"float image has values in [{low:.4g}, {high:.4g}]; expected [0, 1] (or uint8)")
    return np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def resize_naive(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 HWC image resized to ``size x size`` (aspect not kept) by Pillow's bicubic filter (a = -0.5,
    antialiased when shrinking): the processor's pixels exactly. A ``size x size`` image is returned as is."""
    if image.shape[:2] == (size, size):
        return image
    return resize_uint8_pil(image, size, size, "bicubic")


def prepare_openvla_image(image: Any, size: int = 224) -> torch.Tensor:
    """OpenVLA ``pixel_values`` ``(6, size, size)`` float32: the DINOv2 view then the SigLIP view, each
    ``(u / 255 - mean[c]) / std[c]`` of the resized uint8 pixels ``u``.

    Done as a lookup of each uint8 value in a table of those fp32 results (:func:`_openvla_pixel_table`,
    the same operations in the same order, so bit-identical), on one thread: a robot host's busy cores
    cannot stall it the way they stalled torch's CPU thread pool, which took 2-40 ms for these 300k values
    on the shared H100 machine (``benchmarks/results/h100_2026-11-24_v9/run12_*``)."""
    chw = resize_naive(image_as_uint8(image), size).transpose(2, 0, 1)
    table = _openvla_pixel_table()
    out = np.empty((6, size, size), dtype=np.float32)
    for row in range(6):
        np.take(table[row], chw[row % 3], out=out[row])
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=1)
def _openvla_pixel_table() -> np.ndarray:
    """``(6, 256)`` fp32: row ``3 * view + c`` maps a uint8 value ``u`` to ``(u / 255 - mean[c]) / std[c]``
    of the DINOv2 (view 0) or SigLIP (view 1) normalisation, in fp32 as the tensor code computes it."""
    u = np.arange(256, dtype=np.float32) / np.float32(255.0)
    rows = [(u - np.float32(mean[c])) / np.float32(std[c])
            for mean, std in ((DINO_MEAN, DINO_STD), (SIGLIP_MEAN, SIGLIP_STD)) for c in range(3)]
    table = np.stack(rows)
    table.setflags(write=False)
    return table


class SentencePieceTokenizer:
    """A SentencePiece ``tokenizer.model`` (Llama's or PaliGemma's): ids with BOS, piece lookup."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise TokenizerError(f"tokenizer {path} does not exist; expected the checkpoint's SentencePiece "
                                 "tokenizer.model (pass tokenizer_path=)")
        spm = _import_optional("sentencepiece")
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"cannot load SentencePiece model {path}: {err}") from err
        if self.processor.bos_id() < 0:
            raise TokenizerError(f"SentencePiece model {path} has no BOS token")
        self.path = path

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def piece_id(self, piece: str) -> int | None:
        """Id of ``piece``, or None when the vocabulary does not hold it."""
        i = self.processor.piece_to_id(piece)
        return None if i == self.processor.unk_id() and piece != self.processor.id_to_piece(i) else i

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self.processor.encode(text))
        return [self.bos_id, *ids] if add_bos else ids


def check_prompt_ids(ids: Any, vocab_size: int, max_len: int) -> list[int]:
    """User-given prompt ids as a list: 1-D integers in ``[0, vocab_size)``, at most ``max_len``."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"prompt_tokens must be a non-empty 1-D list of integer ids, got shape {array.shape} "
                         f"dtype {array.dtype}")
    bad = array[(array < 0) | (array >= vocab_size)]
    if bad.size:
        raise InputError(f"prompt_tokens contain ids {sorted(set(bad.tolist()))[:10]} outside [0, {vocab_size})")
    if array.size > max_len:
        raise InputError(f"the prompt is {array.size} tokens long; this engine takes at most {max_len} "
                         "(raise max_text_tokens in model_config)")
    return [int(i) for i in array]
