"""Decoding images safely and the resize policies that prepare them for the model.

Everything here works on one image at a time and reports a bad image as an ``ImageError`` that
names the file, so a batch encoder can record the failure and go on. PIL's global settings
(``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``) are never changed: our own pixel limit is checked
from the header before any pixel is decoded, and truncation is caught by forcing a full decode
(if some other library has set ``LOAD_TRUNCATED_IMAGES = True``, PIL pads truncated files silently
and we cannot tell). Images between PIL's warning limit (~89 MP) and ours still make PIL emit a
``DecompressionBombWarning``; the CLI may filter it, the library leaves warnings alone.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageOps

from viq.errors import ConfigError, ImageError

if TYPE_CHECKING:
    import torch

#: Default decoded-pixel limit: the same number PIL refuses outright (2 x its warning limit).
DEFAULT_MAX_PIXELS = 178_956_970

#: Formats we are willing to decode. Others (EPS needs Ghostscript, PDF, exotic scientific
#: formats) are refused as "not a supported image" rather than handed to their plugins.
SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO",
                "JPEG2000", "AVIF", "HEIF", "QOI", "PCX", "SGI")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


def _error(name: str, reason: str) -> ImageError:
    err = ImageError(f"{name}: {reason}")
    err.source, err.reason = name, reason  # structured copies for failure logs
    return err


def _formats() -> tuple[str, ...]:
    Image.init()  # registers every installed plugin; Image.open raises KeyError on unknown names
    return tuple(f for f in SAFE_FORMATS if f in Image.OPEN)


def load_rgb(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             name: str | None = None) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) into an upright 8-bit RGB image.

    Raises ``ImageError`` naming the file for every way an input can be bad: unreadable path,
    empty, not a (supported) image, more than ``max_pixels`` pixels (checked from the header,
    before decoding; ``None`` = no limit of ours, though PIL's own hard cap still applies),
    truncated or corrupt data. Multi-frame files give their first frame.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        data = bytes(source)
        if not data:
            raise _error(name, "empty file")
        return _decode(io.BytesIO(data), name, max_pixels)
    name = name or os.fspath(source)
    from viq.sources.base import open_regular  # regular files only: a FIFO or device never blocks a read

    fp, size = open_regular(source, name)
    with fp:
        if size == 0:
            raise _error(name, "empty file")
        return _decode(fp, name, max_pixels)


def _decode(fp, name: str, max_pixels: int | None) -> Image.Image:
    try:
        im = Image.open(fp, formats=_formats())
    except Image.DecompressionBombError as e:
        raise _error(name, f"possible decompression bomb, over PIL's own cap ({e})") from None
    except Image.UnidentifiedImageError:
        raise _error(name, "not an image (or not a supported format)") from None
    except Exception as e:  # plugins raise many kinds on garbage headers
        raise _error(name, f"corrupt or truncated image header ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise _error(name, f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise _error(name, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                           "(possible decompression bomb)")
    try:
        im.load()  # full decode here, so truncation fails now and not later
    except Image.DecompressionBombError as e:
        raise _error(name, f"possible decompression bomb, over PIL's own cap ({e})") from None
    except (OSError, SyntaxError, EOFError, ValueError) as e:
        reason = "truncated" if "truncated" in str(e) or isinstance(e, EOFError) else "corrupt"
        raise _error(name, f"{reason} image data ({e})") from None
    except Exception as e:
        raise _error(name, f"cannot decode ({type(e).__name__}: {e})") from None
    if _may_have_orientation(im):
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception:
            pass  # a broken EXIF block should not cost an otherwise good image
    try:
        return to_rgb(im)
    except Exception as e:
        raise _error(name, f"cannot convert {im.mode!r} to RGB ({e})") from None


#: where PIL's ``getexif`` looks for an orientation (EXIF blocks and XMP packets)
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _may_have_orientation(im: Image.Image) -> bool:
    """False only when ``getexif`` (PIL's own, not a plugin's) has no source to read an orientation
    from: skipping ``exif_transpose`` then saves ~40 us per image, a sixth of a small JPEG's decode."""
    return (type(im).getexif is not Image.Image.getexif or hasattr(im, "tag_v2")
            or any(k in im.info for k in _ORIENTATION_SOURCES))


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a viewer would show it.

    Transparency is composited over white. 16-bit grey is scaled (v * 255 / 65535, rounded),
    not clipped. 32-bit integer ``I``: non-negative values up to 65535 are read as 16-bit,
    anything else is stretched min..max. Float ``F``: values within [0, 1] are scaled by 255,
    anything else is stretched min..max (NaN -> 0). ICC profiles are not applied (as in the
    reference, which used PIL's plain ``convert``).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_deep_to_u8(im)).convert("RGB")  # 2-D uint8 -> "L"
    if (mode == "P" and "transparency" in im.info) or mode in ("PA", "LA", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX, ...


def _deep_to_u8(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.min() >= 0.0 and a.max() <= 1.0:
            return np.round(a * 255.0).astype(np.uint8)
        return _stretch(a)
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        return _stretch(a.astype(np.float64))
    return ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a - lo) * 255.0 / (hi - lo)).astype(np.uint8)


def to_pixels(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 (3, H, W) in [-1, 1]: ``float32(u8) / 127.5 - 1``.

    Bit-identical to the reference's CLIPImageProcessor (rescale 1/255, mean = std = 0.5).
    """
    if img.mode != "RGB":
        raise ConfigError(f"to_pixels needs an RGB image, got mode {img.mode!r}; use load_rgb")
    # numpy, in place on one planar float32 copy: the same IEEE float32 operations (every value
    # checked), a third of the cost of torch's per-op overhead on a small image
    x = np.asarray(img).transpose(2, 0, 1).astype(np.float32, order="C")
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    import torch  # here: the rest of this module (policies, decoding) serves the CLI's checks without torch

    return torch.from_numpy(x)


# ---- resize policies --------------------------------------------------------------------------


@dataclass(frozen=True)
class NoResize:
    """Feed the decoded pixels as they are.

    The model itself zero-pads right/bottom to a multiple of 16 after normalisation (value 0 =
    mid grey), and that padded area is encoded too.
    """

    def apply(self, img: Image.Image) -> Image.Image:
        return img

    def describe(self) -> str:
        return "none"


@dataclass(frozen=True)
class CenterCrop:
    """The reference's ``process_image``: short side -> T (bicubic), then a centred T x T crop.

    Kept bit-identical, quirks included: the long side is ``int(T / short * long)`` (truncated
    float) and the crop box is passed as floats for PIL to round (half to even).
    """

    size: int = 1024

    def __post_init__(self):
        if int(self.size) != self.size or self.size < 1:
            raise ConfigError(f"center-crop size must be a positive integer, got {self.size!r}")

    def apply(self, img: Image.Image) -> Image.Image:
        t = self.size
        w, h = img.size
        if w < h:
            nw, nh = t, int(t / w * h)
        else:
            nw, nh = int(t / h * w), t
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        return img.crop(((nw - t) / 2, (nh - t) / 2, (nw + t) / 2, (nh + t) / 2))

    def describe(self) -> str:
        return f"center-crop:{self.size}"


@dataclass(frozen=True)
class Native:
    """Keep the aspect ratio; shrink only images above ``max_pixels`` (the encoding default).

    Images with W*H <= max_pixels are untouched (the model pads to the patch multiple). Larger ones
    are scaled by s = sqrt(max_pixels / (W*H)) with each side FLOORED to a multiple of ``patch``,
    computed exactly in integers (side = isqrt(max_pixels * W // H) // patch * patch), so W'*H'
    never exceeds max_pixels. A side that would fall below ``patch`` becomes ``patch`` and the
    other side is then capped so the budget still holds. Resampling is bicubic (antialiased).
    """

    max_pixels: int = 1024 * 1024
    patch: int = 16

    def __post_init__(self):
        if self.patch < 1 or self.max_pixels < self.patch * self.patch:
            raise ConfigError(f"native policy needs patch >= 1 and max_pixels >= patch^2, "
                              f"got max_pixels={self.max_pixels}, patch={self.patch}")

    def target_size(self, w: int, h: int) -> tuple[int, int]:
        """The (W, H) that ``apply`` resizes a W x H image to."""
        m, p = self.max_pixels, self.patch
        if w * h <= m:
            return w, h
        nw = max(p, math.isqrt(m * w // h) // p * p)
        nh = max(p, math.isqrt(m * h // w) // p * p)
        if nw * nh > m:  # only when a side was raised to `patch`: shrink the other one
            if nw == p:
                nh = max(p, m // nw // p * p)
            else:
                nw = max(p, m // nh // p * p)
        return nw, nh

    def apply(self, img: Image.Image) -> Image.Image:
        size = self.target_size(*img.size)
        return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)

    def describe(self) -> str:
        extra = "" if self.patch == 16 else f",patch={self.patch}"
        return f"native:max_pixels={self.max_pixels}{extra}"


Policy = Union[Native, CenterCrop, NoResize]


def parse_policy(text: str) -> Policy:
    """Parse ``none``, ``center-crop:T``, ``native[:N]`` or ``native:max_pixels=N[,patch=P]``.

    Every ``describe()`` string parses back to an equal policy.
    """
    if isinstance(text, (Native, CenterCrop, NoResize)):
        return text
    s = str(text).strip().lower()
    kind, _, arg = s.partition(":")
    try:
        if kind == "none" and not arg:
            return NoResize()
        if kind == "center-crop" and arg:
            return CenterCrop(_int(arg))
        if kind == "native":
            if not arg:
                return Native()
            if "=" not in arg:
                return Native(max_pixels=_int(arg))
            opts = dict(part.split("=", 1) for part in arg.split(","))
            unknown = set(opts) - {"max_pixels", "patch"}
            if unknown:
                raise ValueError(f"unknown option(s) {sorted(unknown)}")
            return Native(**{k: _int(v) for k, v in opts.items()})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bad resize policy {text!r}: {e}") from None
    raise ConfigError(f"unknown resize policy {text!r}; use 'native', 'native:<max_pixels>', "
                      "'center-crop:<size>' or 'none'")


def _int(v: str) -> int:
    n = int(v.strip().replace("_", ""))
    if n < 1:
        raise ValueError(f"{v!r} must be a positive integer")
    return n


# ---- the whole way from a file to model input ---------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """What preprocessing did to one image; stored with its codes."""

    source: str
    original_size: tuple[int, int]  # (W, H) after EXIF orientation
    size: tuple[int, int]  # (W, H) fed to the model, before the model's own padding
    policy: str


@dataclass(frozen=True)
class Preprocessor:
    """Decode + resize + normalise with fixed settings; picklable for DataLoader workers."""

    policy: Policy = Native()
    max_input_pixels: int | None = DEFAULT_MAX_PIXELS

    def __call__(self, source: ImageSource,
                 name: str | None = None) -> tuple[torch.Tensor, ImageInfo]:
        img = load_rgb(source, max_pixels=self.max_input_pixels, name=name)
        original = img.size
        img = self.policy.apply(img)
        label = name or ("<bytes>" if isinstance(source, (bytes, bytearray, memoryview))
                         else str(Path(source)))
        return to_pixels(img), ImageInfo(label, original, img.size, self.policy.describe())

    prepare = __call__


def prepare(source: ImageSource, policy: Policy | str = Native(),
            max_input_pixels: int | None = DEFAULT_MAX_PIXELS,
            name: str | None = None) -> tuple[torch.Tensor, ImageInfo]:
    """One image -> (pixels (3, H, W) float32, ImageInfo). ``policy`` may be a policy string."""
    return Preprocessor(parse_policy(policy), max_input_pixels)(source, name=name)
