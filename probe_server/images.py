"""The ball images, drawn once at import and served from memory.

A PNG is a few chunks around zlib-compressed scanlines; drawing a shaded disc
here avoids shipping binary files and an imaging library.

The balls are indexed-colour PNGs (a palette of a few dozen shades with
their transparency), well under 1 KB: a blue ball's whole HTTP response fits
in one packet on a 1280-byte path (IPv6's minimum MTU), so the basic IPv6
probe never depends on path-MTU discovery. The battery's large-response
probe is the one that tests that (see :mod:`probe_server.battery`).
"""

from __future__ import annotations

import math
import struct
import zlib

BALL_SIZE = 48
RED = (0xD6, 0x27, 0x28)
BLUE = (0x1F, 0x5F, 0xD6)
# Shades of the highlight and steps of the anti-aliased edge: enough that the
# ball looks smooth at 48x48, few enough for a small palette.
LIGHT_LEVELS = 16
EDGE_LEVELS = 8

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, colour_type: int, rows: list[bytes], *chunks: bytes) -> bytes:
    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + b"".join(chunks)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def encode_png(width: int, height: int, rgba: bytes) -> bytes:
    """Encode 8-bit RGBA pixels (row-major) as a PNG file."""
    stride = width * 4
    rows = [rgba[y * stride : (y + 1) * stride] for y in range(height)]
    return _png(width, height, 6, rows)


def encode_indexed_png(
    width: int, height: int, indices: bytes, palette: list[tuple[int, int, int, int]]
) -> bytes:
    """Encode palette indices (row-major) with an RGBA palette (PLTE and tRNS)."""
    if len(palette) > 256:
        raise ValueError("a PNG palette holds at most 256 colours")
    rows = [indices[y * width : (y + 1) * width] for y in range(height)]
    plte = b"".join(bytes(colour[:3]) for colour in palette)
    alphas = bytes(colour[3] for colour in palette).rstrip(b"\xff")
    chunks = [_chunk(b"PLTE", plte)]
    if alphas:
        chunks.append(_chunk(b"tRNS", alphas))
    return _png(width, height, 3, rows, *chunks)


def ball_png(color: tuple[int, int, int], size: int = BALL_SIZE) -> bytes:
    """A shaded, anti-aliased disc on a transparent background, indexed colour."""
    r0 = size / 2 - 1
    centre = size / 2
    palette: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
    index: dict[tuple[int, int, int, int], int] = {palette[0]: 0}
    indices = bytearray()
    for y in range(size):
        for x in range(size):
            dx, dy = x + 0.5 - centre, y + 0.5 - centre
            distance = math.hypot(dx, dy)
            alpha = max(0.0, min(1.0, r0 - distance + 0.5))
            # A highlight towards the upper left makes it read as a ball.
            light = max(0.0, 1 - math.hypot(dx + r0 / 3, dy + r0 / 3) / (r0 * 1.2))
            light = round(light * (LIGHT_LEVELS - 1)) / (LIGHT_LEVELS - 1)
            a = round(alpha * EDGE_LEVELS) * 255 // EDGE_LEVELS
            if a == 0:
                indices.append(0)
                continue
            red, green, blue = (min(255, int(c + (255 - c) * light * 0.6)) for c in color)
            rgba = (red, green, blue, a)
            found = index.get(rgba)
            if found is None:
                found = index[rgba] = len(palette)
                palette.append(rgba)
            indices.append(found)
    return encode_indexed_png(size, size, bytes(indices), palette)


def pixel_png() -> bytes:
    """One transparent pixel: the battery's probes, which nobody is meant to see."""
    return encode_indexed_png(1, 1, b"\x00", [(0, 0, 0, 0)])


RED_BALL = ball_png(RED)
BLUE_BALL = ball_png(BLUE)
PIXEL = pixel_png()
