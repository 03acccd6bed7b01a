"""A dependency-free PNG line chart, used for plots when matplotlib is not installed.

Enough for a benchmark figure: panels with axes, ticks, labelled series (polyline + markers) and a
legend, text in a 3x5 pixel font (upper case, digits, a few symbols), written with zlib.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Sequence

_FONT_ROWS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", "/": "001001010100100", "(": "010100100100010",
    ")": "010001001001010", ":": "000010000010000", "_": "000000000000111", "%": "101001010100101",
    " ": "000000000000000", "=": "000111000111000", "+": "000010111010000", ",": "000000000010100",
    "?": "111001010000010", "|": "010010010010010", "*": "000101010101000", "x": "000101010101000",
}
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


class Canvas:
    """An RGB raster with lines, rectangles and text; ``save`` writes a PNG."""

    def __init__(self, width: int, height: int, background=(255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def point(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(max(0, min(y0, y1)), min(self.height, max(y0, y1) + 1)):
            for x in range(max(0, min(x0, x1)), min(self.width, max(x0, x1) + 1)):
                self.point(x, y, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        half = width // 2
        for i in range(steps + 1):
            x = round(x0 + (x1 - x0) * i / steps)
            y = round(y0 + (y1 - y0) * i / steps)
            for dx in range(-half, width - half):
                for dy in range(-half, width - half):
                    self.point(x + dx, y + dy, color)

    def text(self, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 2) -> int:
        """Draw ``text`` with its top-left at (x, y); returns the width drawn."""
        cursor = x
        for char in text:
            glyph = _FONT_ROWS.get(char) or _FONT_ROWS.get(char.upper(), _FONT_ROWS["?"])
            for row in range(5):
                for col in range(3):
                    if glyph[row * 3 + col] == "1":
                        self.rect(cursor + col * scale, y + row * scale, cursor + col * scale + scale - 1,
                                  y + row * scale + scale - 1, color)
            cursor += 4 * scale
        return cursor - x

    @staticmethod
    def text_width(text: str, scale: int = 2) -> int:
        return len(text) * 4 * scale

    def save(self, path: "str | Path") -> None:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * y * self.width:3 * (y + 1) * self.width])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                               + chunk(b"IEND", b""))


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """0 and round steps up to at least ``high``."""
    if high <= 0 or not math.isfinite(high):
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.ceil(high / step - 1e-9)) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def line_chart(path: "str | Path", panels: Sequence[dict], series_labels: Sequence[str], title: str = "",
               panel_size=(460, 320)) -> None:
    """Side-by-side panels; each panel ``{"title", "xlabel", "series": [[(x, y), ...] per label]}``."""
    pw, ph = panel_size
    margin_l, margin_b, margin_t = 70, 40, 40
    legend_h = 16 * len(series_labels) + 10
    width = len(panels) * (pw + margin_l + 20) + 20
    height = ph + margin_b + margin_t + legend_h + (30 if title else 0)
    canvas = Canvas(width, height)
    top = 10
    if title:
        canvas.text(20, top, title, scale=2)
        top += 30
    for p, panel in enumerate(panels):
        ox = 20 + p * (pw + margin_l + 20) + margin_l
        oy = top + margin_t
        xs = [x for s in panel["series"] for x, _ in s] or [0, 1]
        ys = [y for s in panel["series"] for _, y in s if math.isfinite(y)] or [1]
        x_lo, x_hi = min(xs), max(xs)
        if x_hi == x_lo:
            x_hi = x_lo + 1
        ticks = nice_ticks(max(ys) * 1.05)
        y_hi = ticks[-1]

        def sx(x):
            return ox + (x - x_lo) / (x_hi - x_lo) * (pw - 10) + 5

        def sy(y):
            return oy + ph - (y / y_hi) * ph

        canvas.text(ox, oy - 24, panel.get("title", ""), scale=2)
        for tick in ticks:
            y = round(sy(tick))
            canvas.line(ox, y, ox + pw, y, (225, 225, 225))
            label = _label(tick)
            canvas.text(ox - 8 - Canvas.text_width(label), y - 5, label)
        for x in sorted(set(xs)):
            px = round(sx(x))
            canvas.line(px, oy + ph, px, oy + ph + 4, (0, 0, 0))
            label = _label(x)
            canvas.text(px - Canvas.text_width(label) // 2, oy + ph + 8, label)
        canvas.line(ox, oy, ox, oy + ph, (0, 0, 0))
        canvas.line(ox, oy + ph, ox + pw, oy + ph, (0, 0, 0))
        canvas.text(ox + pw // 2 - Canvas.text_width(panel.get("xlabel", "")) // 2, oy + ph + 24, panel.get("xlabel", ""))
        for i, series in enumerate(panel["series"]):
            color = PALETTE[i % len(PALETTE)]
            points = [(sx(x), sy(y)) for x, y in series if math.isfinite(y)]
            for (x0, y0), (x1, y1) in zip(points, points[1:]):
                canvas.line(x0, y0, x1, y1, color, width=2)
            for x, y in points:
                canvas.rect(round(x) - 3, round(y) - 3, round(x) + 3, round(y) + 3, color)
    ly = top + margin_t + ph + margin_b + 4
    for i, label in enumerate(series_labels):
        color = PALETTE[i % len(PALETTE)]
        canvas.rect(20 + margin_l, ly + 16 * i, 20 + margin_l + 18, ly + 16 * i + 9, color)
        canvas.text(20 + margin_l + 26, ly + 16 * i, label)
    canvas.save(path)
