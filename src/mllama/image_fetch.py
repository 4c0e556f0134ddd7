"""Images named in API requests: base64 `data:` URIs and http(s) URLs, under the server's limits.

URLs are fetched by the library's guarded fetcher (mllama.image_guard: public addresses only unless
allowed, the connection pinned to the checked address, each redirect checked, one deadline, a byte
limit while streaming, the first bytes sniffed for an accepted format), run in a small pool of
worker threads so that slow image hosts never hold the event loop or the threads that build prompts.
`data:` URIs are held to stricter rules than the library's (an image/* media type, strict base64,
the byte limit checked before decoding). Decoded images are bounded in pixels before their pixels
are read. Every refusal is an ImageInputError whose `status` is the HTTP status to answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from PIL import Image

from mllama.image_guard import ImageInputError, ImageLimits, fetch_image_bytes, open_limited

__all__ = ["ImageInputError", "ImagePolicy", "decode_data_uri", "fetch", "load_image_url"]

# Each fetch ends by its deadline, so a full pool only delays the next fetches, which then fail at
# their own deadline, never later.
_FETCHERS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="mllama-image-fetch")


@dataclass(frozen=True)
class ImagePolicy(ImageLimits):
    """The server's limits: those of ImageLimits, and request images never name local files."""

    allow_local: bool = False


async def load_image_url(url: str, policy: ImagePolicy) -> Image.Image:
    """An RGB image from a `data:` URI or an http(s) URL."""
    if url.startswith("data:"):
        data = decode_data_uri(url, policy)
    else:
        data = await fetch(url, policy)
    return await asyncio.to_thread(open_limited, data, what="the image", limits=policy)


def decode_data_uri(url: str, policy: ImagePolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageInputError("a data: image URL must be base64: data:image/png;base64,...")
    media = header[len("data:"):-len(";base64")].strip().lower()
    if media and not media.startswith("image/"):
        raise ImageInputError(f"a data: image URL must have an image/* media type, got {media!r}")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise ImageInputError(f"the image is larger than the limit of {policy.max_bytes} bytes", status=413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageInputError(f"the data: URL's base64 payload does not decode: {err}") from None


async def fetch(url: str, policy: ImagePolicy) -> bytes:
    """The body of an http(s) URL under the policy's limits."""
    deadline = time.monotonic() + policy.timeout
    work = asyncio.get_running_loop().run_in_executor(_FETCHERS, partial(fetch_image_bytes, url, policy,
                                                                         deadline=deadline))
    try:
        # The fetcher keeps its own deadline; this one also covers a name lookup that hangs, which the
        # thread cannot interrupt (it ends in the background).
        return await asyncio.wait_for(work, policy.timeout + 0.5)
    except asyncio.TimeoutError:
        raise ImageInputError(f"fetching {url!r:.100} took longer than {policy.timeout:g} s") from None
