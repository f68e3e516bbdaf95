"""The ball images, drawn once at import and served from memory.

A PNG is a few chunks around zlib-compressed scanlines; drawing a shaded disc
here avoids shipping binary files and an imaging library.
"""

from __future__ import annotations

import math
import struct
import zlib

BALL_SIZE = 48
RED = (0xD6, 0x27, 0x28)
BLUE = (0x1F, 0x5F, 0xD6)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(width: int, height: int, rgba: bytes) -> bytes:
    """Encode 8-bit RGBA pixels (row-major) as a PNG file."""
    stride = width * 4
    raw = b"".join(b"\x00" + rgba[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def ball_png(color: tuple[int, int, int], size: int = BALL_SIZE) -> bytes:
    """A shaded, anti-aliased disc on a transparent background."""
    r0 = size / 2 - 1
    centre = size / 2
    pixels = bytearray()
    for y in range(size):
        for x in range(size):
            dx, dy = x + 0.5 - centre, y + 0.5 - centre
            distance = math.hypot(dx, dy)
            alpha = max(0.0, min(1.0, r0 - distance + 0.5))
            # A highlight towards the upper left makes it read as a ball.
            light = max(0.0, 1 - math.hypot(dx + r0 / 3, dy + r0 / 3) / (r0 * 1.2))
            rgb = (min(255, int(c + (255 - c) * light * 0.6)) for c in color)
            pixels.extend((*rgb, int(alpha * 255)))
    return encode_png(size, size, bytes(pixels))


RED_BALL = ball_png(RED)
BLUE_BALL = ball_png(BLUE)
