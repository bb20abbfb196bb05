"""Image preprocessing values: BLIP-2's eval resize + CLIP normalisation, the train-time crop/flip, and the
limits untrusted images (uploads, data: URLs) pass."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4qwen.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageError,
    ImageLimits,
    ImageProcessor,
    ImageTooLarge,
    TooManyImages,
    data_url_bytes,
    decode_image,
    load_image,
    open_image,
    probe_image,
    random_resized_crop_box,
)


def test_eval_transform_values():
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    x = ImageProcessor(16, train=False)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    for c, v in enumerate((255, 0, 128)):
        assert torch.allclose(x[c], torch.full((16, 16), (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-5)


def test_eval_resize_is_bicubic_of_the_whole_image():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    x = ImageProcessor(24, train=False)(img)
    ref = np.asarray(img.resize((24, 24), Image.BICUBIC), dtype=np.float32) / 255
    ref = (ref - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_random_resized_crop_within_bounds_and_scale():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(200, 100, (0.5, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 100
        assert 0.5 * 200 * 100 * 0.95 <= w * h <= 200 * 100 * 1.01 or (w, h) in ((133, 100), (200, 100))
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_train_transform_is_deterministic_per_generator_and_flips():
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :16] = 255  # left half white
    img = Image.fromarray(arr)
    proc = ImageProcessor(32, train=True, random_resized_crop=False, hflip=True)
    outs = [proc(img, torch.Generator().manual_seed(s)) for s in range(20)]
    left_white = [bool(o[0, :, :8].mean() > o[0, :, 24:].mean()) for o in outs]
    assert any(left_white) and not all(left_white)  # both flipped and unflipped occur
    a = ImageProcessor(32, train=True)(img, torch.Generator().manual_seed(7))
    b = ImageProcessor(32, train=True)(img, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    no_aug = ImageProcessor(32, train=True, random_resized_crop=False, hflip=False)
    assert torch.equal(no_aug(img, torch.Generator().manual_seed(1)), ImageProcessor(32)(img))


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="nope.png.*not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageError, match="bad.jpg.*cannot be decoded"):
        load_image(bad)


def test_untrusted_image_limits():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    limits = ImageLimits(max_bytes=10_000, max_pixels=100, max_count=2)
    assert open_image(data_url_bytes(url, limits), limits).size == (8, 8)
    assert data_url_bytes("https://example.com/cat.png", limits) is None  # remote: the caller fetches or refuses
    with pytest.raises(ImageTooLarge, match="bytes"):  # the declared size, before decoding
        data_url_bytes(url, ImageLimits(max_bytes=10))
    with pytest.raises(ImageTooLarge, match="pixels"):
        open_image(buf.getvalue(), ImageLimits(max_pixels=16))
    for bad in ("data:image/gif;base64,R0lGODlh", "data:image/png;base64,@@@"):
        with pytest.raises(ImageError):
            data_url_bytes(bad, limits)
    limits.check_count(2)
    with pytest.raises(TooManyImages, match="3 images; at most 2"):
        limits.check_count(3)


def test_shrunk_image_gives_the_same_tensor():
    """The API keeps uploads at the processor's size; the model must see exactly what the full image gives."""
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    proc = ImageProcessor(24, train=False)
    small = proc.shrink(img)
    assert small.size == (24, 24)
    assert torch.equal(proc(small), proc(img))


def test_probe_reads_the_header_only():
    """Declared pixels are known (and checked) before anything is decoded."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, format="PNG")
    img = probe_image(buf.getvalue(), ImageLimits())
    assert img.size == (64, 48) and img.tile  # tiles still to decode: Pillow has read the header only
    assert decode_image(img).size == (64, 48)
    with pytest.raises(ImageTooLarge):
        ImageLimits(max_request_pixels=2 * 64 * 48).check_request_pixels(3 * 64 * 48)
