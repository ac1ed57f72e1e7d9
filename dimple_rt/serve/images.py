# SPDX-License-Identifier: Apache-2.0
"""Images of a chat request: an ``image_url`` part's URL → a decoded PIL image, or a 400 that says what to fix.

Accepted: a ``data:`` URL with base64 content, and (only when the server has an image folder) a path inside that
folder, plain or as ``file://``. The server never fetches: ``http(s)`` URLs are refused. Sizes are checked from the
image header before any pixel is decoded, so a decompression bomb costs nothing; sides and aspect ratio are
checked with the processor's own rule (``smart_resize``), so every image that passes here can be processed.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from dimple_rt.processor import smart_resize

from .errors import bad_request


@dataclass(frozen=True)
class ImageLimits:
    """What one request may send."""

    max_images: int = 4
    """Images per request (over all messages)."""
    max_bytes: int = 16 * 1024 * 1024
    """Encoded size of one image (the file, or the base64-decoded data URL)."""
    max_pixels: int = 4096 * 4096
    """width x height of one image, read from its header before decoding."""


DEFAULT_LIMITS = ImageLimits()


def load_request_image(url: object, param: str, image_dir: Path | None, limits: ImageLimits) -> PIL.Image.Image:
    """The image an ``image_url.url`` names, decoded. ``param`` names the field in errors."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param} must be a non-empty string (a data: URL or a path inside the image folder)", param)
    lowered = url[:16].lower()
    if lowered.startswith(("http://", "https://")):
        raise bad_request(
            f"{param}: remote image URLs are not supported: this server never fetches. Send the image inline as a "
            "data:image/png;base64,... URL" + (" or as a path inside the server's image folder" if image_dir else ""),
            param,
            code="remote_image_url",
        )
    if lowered.startswith("data:"):
        data = _data_url_bytes(url, param, limits)
        where = "the data URL"
    else:
        path = _local_path(url, param, image_dir)
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise bad_request(f"{param}: {url} is {size} bytes; at most {limits.max_bytes} are accepted", param)
        data = path.read_bytes()
        where = url
    return _decode(data, where, param, limits)


def _data_url_bytes(url: str, param: str, limits: ImageLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request(f"{param}: a data URL needs a comma: data:image/png;base64,<base64 data>", param)
    if not header.lower().endswith(";base64"):
        raise bad_request(f"{param}: only base64 data URLs are accepted (data:image/png;base64,<data>)", param)
    if len(payload) > (limits.max_bytes * 4) // 3 + 4:
        raise bad_request(f"{param}: the image is larger than {limits.max_bytes} bytes", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{param}: the data URL's base64 is broken ({err}); encode the file with base64", param)


def _local_path(url: str, param: str, image_dir: Path | None) -> Path:
    """A path inside ``image_dir``: relative to it, or absolute below it. ``..`` is refused outright and the
    resolved path (symlinks followed) must still lie inside the folder."""
    if image_dir is None:
        raise bad_request(
            f"{param}: local image paths are disabled on this server (start it with --image-dir); send the image "
            "as a data:image/png;base64,... URL",
            param,
        )
    raw = url[len("file://") :] if url.lower().startswith("file://") else url
    candidate = Path(raw)
    if ".." in candidate.parts:
        raise bad_request(f"{param}: image paths may not contain '..'", param)
    root = image_dir.resolve()
    path = candidate if candidate.is_absolute() else root / candidate
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise bad_request(f"{param}: no such image in the image folder: {raw}", param) from None
    if not resolved.is_relative_to(root):
        raise bad_request(f"{param}: {raw} is outside the image folder (symlinks may not leave it)", param)
    if not resolved.is_file():
        raise bad_request(f"{param}: {raw} is not a file", param)
    return resolved


def _decode(data: bytes, where: str, param: str, limits: ImageLimits) -> PIL.Image.Image:
    if len(data) > limits.max_bytes:
        raise bad_request(f"{param}: the image is {len(data)} bytes; at most {limits.max_bytes} are accepted", param)
    try:
        image = PIL.Image.open(io.BytesIO(data))
        width, height = image.size
    except Exception as err:  # PIL raises many types for bad data; every one is the client's file
        reason = "" if isinstance(err, PIL.UnidentifiedImageError) else f": {err}"
        message = f"{param}: {where} is not a readable image (PNG, JPEG, GIF, WebP, ...){reason}"
        raise bad_request(message, param) from err
    if width * height > limits.max_pixels:
        raise bad_request(
            f"{param}: the image is {width}x{height} pixels; at most {limits.max_pixels} pixels are accepted", param
        )
    try:
        smart_resize(height, width)
    except ValueError as err:
        raise bad_request(f"{param}: {err}", param) from None
    try:
        image.load()  # decoded as a path given to Runtime would be; the processor converts to RGB
        return image
    except Exception as err:
        raise bad_request(f"{param}: {where} could not be decoded (truncated or corrupt?): {err}", param) from err
