"""Image files: reading them safely, writing PNGs, and the captioned grids people look at.

``open_rgb`` checks an image's header before decoding it; ``read_images`` reads the images the
CLI is given (scaled back from ``generate``'s enlargements); ``save_png`` and ``render_grid``
write atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transfusion.errors import BadInput, MissingInput
from transfusion.io import atomic_file


def open_rgb(path: Path, max_pixels: int, size_ok=None):
    """The image at ``path`` as an RGB PIL image, decoded only after its header's size passed
    (at most ``max_pixels``, and ``size_ok(width, height)`` when given): a crafted or huge file
    is refused before it costs memory. Raises ``MissingInput`` / ``BadInput`` naming the file."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours below is stricter, and names the size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                if w * h > max_pixels:
                    raise BadInput(f"{path}: {w}x{h} pixels, more than the {max_pixels} this reads")
                if size_ok is not None:
                    size_ok(w, h)
                im.load()
                return to_rgb(im, str(path))
    except FileNotFoundError:
        raise MissingInput(f"{path}: no such image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadInput(f"{path}: refused, too many pixels ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadInput(f"{path}: cannot read image ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


BACKGROUND = (0, 0, 0)  # transparent pixels land on the canvas colour of the scenes: black


def to_rgb(im, where: str):
    """A decoded PIL image as 8-bit RGB, by what its mode means rather than by clipping:
    EXIF orientation applied; 16-bit and 32-bit integer grey scaled from 0..65535 (Pillow's
    ``convert`` clips them, a mid-grey 16-bit image became white); float grey scaled from 0..1;
    transparency (RGBA, LA, a palette's transparent index) composited on ``BACKGROUND``; CMYK and
    the rest through Pillow's own conversions. What has no meaning as a picture is a
    ``BadInput`` naming ``where``."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(im, dtype=np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise BadInput(f"{where}: a {im.mode} image with values outside 0..65535")
        return Image.fromarray(np.round(grey / 257).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        grey = np.asarray(im, dtype=np.float64)
        if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 1:
            raise BadInput(f"{where}: a float image is read as 0..1, found values outside it (or NaN)")
        return Image.fromarray(np.round(grey * 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as err:  # e.g. LAB, or a mode Pillow opens but cannot convert
        raise BadInput(f"{where}: cannot convert a {im.mode} image to RGB ({err})") from None


MAX_SCALE = 16  # `generate` writes images enlarged 4x; `caption` takes up to 16x back


def read_images(files: list[Path], size: int) -> np.ndarray:
    """PNG/JPEG files -> uint8 (N, size, size, 3). A square image of an integer multiple of
    ``size`` (up to 16x: what ``generate`` and ``interleave`` write, enlarged) is scaled back
    down; any other size, a bad file, or a header claiming more pixels is a one-line error,
    checked before the image is decoded."""
    from PIL import Image

    def size_ok(w: int, h: int, f: Path) -> None:
        if w != h or w % size or not 1 <= w // size <= MAX_SCALE:
            raise BadInput(
                f"{f}: expected a {size}x{size} image (or a square multiple up to {MAX_SCALE}x), got {w}x{h}"
            )

    out = []
    for f in files:
        rgb = open_rgb(f, (size * MAX_SCALE) ** 2, lambda w, h, f=f: size_ok(w, h, f))
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BOX)  # the exact inverse of a NEAREST enlargement
        out.append(np.asarray(rgb, dtype=np.uint8))
    return np.stack(out)


def save_png(image: np.ndarray, path: Path, scale: int = 1) -> None:
    from PIL import Image

    im = Image.fromarray(image)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_file(Path(path), "wb") as fh:
        im.save(fh, format="PNG")


def render_grid(images: np.ndarray, captions: list[str], path: Path, cols: int = 4, scale: int = 4) -> None:
    """A PNG grid of ``images`` (N, H, W, 3) uint8, each upscaled, its caption below it."""
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    cw, ch, text_h = w * scale, h * scale, 28
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (cols * (cw + 8) + 8, rows * (ch + text_h + 8) + 8), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = 8 + (i % cols) * (cw + 8), 8 + (i // cols) * (ch + text_h + 8)
        tile = Image.fromarray(images[i]).resize((cw, ch), Image.NEAREST)
        sheet.paste(tile, (x, y))
        draw.text((x, y + ch + 4), _wrap(captions[i], cw // 6), fill=(235, 235, 235), font=font)
    with atomic_file(Path(path), "wb") as fh:
        sheet.save(fh, format="PNG")


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
