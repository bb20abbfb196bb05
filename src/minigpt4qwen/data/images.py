"""BLIP-2 image preprocessing with Pillow + torch (torchvision does not install beside the CPU torch build).

train: RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic) + horizontal flip, as LAVIS'
`blip2_image_train`; eval: resize to size x size, bicubic. Both then scale to [0, 1] and normalise with CLIP's
mean/std. Randomness comes from an explicit torch.Generator so that a resumed run draws the same crops.

Untrusted images (web UI uploads, API data: URLs) pass `ImageLimits` before they are decoded: images per request,
bytes on the wire or in the declared base64 length, format, pixels read from the header (decompression bombs) for
each image and summed over a request (`probe_image`, then `decode_image`).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGES = 8
MAX_REQUEST_PIXELS = 4 * MAX_IMAGE_PIXELS
_DATA_URL = re.compile(r"data:image/(png|jpe?g);base64,(.*)", re.DOTALL | re.IGNORECASE)


class ImageError(ValueError):
    """An image that is missing, cannot be decoded or breaks a limit (the user's to fix, reported in one line)."""


class ImageTooLarge(ImageError):
    """Over the byte or pixel limit (a 4xx the client can fix by resizing)."""


class TooManyImages(ImageError):
    """More images than one request may carry."""


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} not found; check the image root of its annotation file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"image {path} cannot be decoded ({exc}); replace or remove the file") from None


@dataclass
class ImageLimits:
    """What an uploaded image may cost: bytes on the wire and pixels after decoding (decompression bombs)."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    formats: tuple[str, ...] = ("PNG", "JPEG")
    max_count: int = MAX_IMAGES
    """Images one API request may carry (the web UI checks each upload, not their number)."""
    max_request_pixels: int = MAX_REQUEST_PIXELS
    """Pixels of all images of one API request together, as their headers declare them."""

    def check_count(self, n: int) -> None:
        if n > self.max_count:
            raise TooManyImages(f"{n} images; at most {self.max_count}")

    def check_request_pixels(self, pixels: int) -> None:
        if pixels > self.max_request_pixels:
            raise ImageTooLarge(f"the images have {pixels} pixels together; the limit is {self.max_request_pixels}")


def _undecodable(exc: Exception) -> ImageError:
    return exc if isinstance(exc, ImageError) else ImageError(f"image cannot be decoded ({exc})")


def probe_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Untrusted image bytes opened lazily: size, format and pixel count checked from the header, nothing decoded."""
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in limits.formats:
            raise ImageError(f"image format {img.format} not accepted; use {' or '.join(limits.formats)}")
        if img.width * img.height > limits.max_pixels:
            raise ImageTooLarge(f"image is {img.width}x{img.height} pixels; the limit is {limits.max_pixels} pixels")
        return img
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _undecodable(exc) from None


def decode_image(img: Image.Image) -> Image.Image:
    """A probed image decoded to RGB."""
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")  # no copy of a large upload that is RGB already
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _undecodable(exc) from None


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode untrusted image bytes after checking size, format and pixel count (read from the header first)."""
    return decode_image(probe_image(data, limits))


def data_url_bytes(url: str, limits: ImageLimits) -> bytes | None:
    """The bytes of a `data:image/png|jpeg;base64,...` URL, its declared size checked before decoding; None when
    `url` is no data: URL at all (a remote one, for the caller to fetch or refuse)."""
    match = _DATA_URL.fullmatch(url.strip())
    if match:
        if len(match.group(2)) > limits.max_bytes * 4 // 3 + 4:
            raise ImageTooLarge(f"image is larger than the limit of {limits.max_bytes} bytes")
        try:
            return base64.b64decode(match.group(2), validate=True)
        except binascii.Error as exc:
            raise ImageError(str(exc)) from None
    if url.startswith("data:"):
        raise ImageError("data URLs must be data:image/png;base64,... or data:image/jpeg;base64,...")
    return None


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop as torchvision's RandomResizedCrop.get_params draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return left, top, w, h
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (arr - mean) / std


class ImageProcessor:
    """Callable: PIL image -> normalised (3, size, size) float tensor."""

    def __init__(
        self, size: int = 224, train: bool = False, crop_scale_min: float = 0.5, hflip: bool = True,
        random_resized_crop: bool = True,
    ) -> None:
        self.size = size
        self.train = train
        self.scale = (crop_scale_min, 1.0)
        self.hflip = hflip
        self.random_resized_crop = random_resized_crop

    def shrink(self, img: Image.Image) -> Image.Image:
        """`img` at the size `__call__` resizes it to, giving the same tensor (Pillow's resize to an image's own
        size is a copy), so that a server holds size x size per image instead of the upload; training crops first,
        so a training processor returns `img` unchanged."""
        return img if self.train else img.resize((self.size, self.size), Image.BICUBIC)

    def __call__(self, img: Image.Image, gen: torch.Generator | None = None) -> torch.Tensor:
        s = self.size
        if self.train and self.random_resized_crop:
            gen = gen if gen is not None else torch.Generator().manual_seed(0)
            left, top, w, h = random_resized_crop_box(img.width, img.height, self.scale, (3 / 4, 4 / 3), gen)
            img = img.resize((s, s), Image.BICUBIC, box=(left, top, left + w, top + h))
        else:
            img = img.resize((s, s), Image.BICUBIC)
        if self.train and self.hflip:
            gen = gen if gen is not None else torch.Generator().manual_seed(0)
            if torch.rand((), generator=gen).item() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img)
