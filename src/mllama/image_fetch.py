"""Images named in API requests: base64 `data:` URIs and http(s) URLs, fetched under limits.

A URL is fetched only from public addresses unless the policy allows private ones: every address
the host name resolves to must be global (not loopback, private, link-local, shared, reserved or
multicast), and the connection goes to the address that was checked (the name is kept for the Host
header and for TLS), so a second DNS answer cannot point the fetch elsewhere. Each redirect is
checked the same way, and only `max_redirects` are followed. The whole fetch has one deadline, the
body one size limit, and the response must say it is an image. `file:` and every other scheme are
refused. Decoded images are bounded in pixels before their pixels are read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from mllama.image_guard import ACCEPTED_FORMATS


class ImageInputError(ValueError):
    """An image that cannot be used; `status` is 413 when it is too large, else 400."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    timeout: float = 10.0
    max_redirects: int = 3
    allow_private: bool = False


async def load_image_url(url: str, policy: ImagePolicy) -> Image.Image:
    """An RGB image from a `data:` URI or an http(s) URL."""
    if url.startswith("data:"):
        data = decode_data_uri(url, policy)
    else:
        data = await fetch(url, policy)
    return await asyncio.to_thread(open_image, data, policy)


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


def open_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)  # not EPS & co (Ghostscript)
        if image.width * image.height > policy.max_pixels:
            raise ImageInputError(f"the image has {image.width}x{image.height} pixels, more than the limit of "
                                  f"{policy.max_pixels}", status=413)
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"the image is too large: {err}", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if isinstance(err, ImageInputError):
            raise
        raise ImageInputError(f"the image cannot be read: {err}") from None


async def fetch(url: str, policy: ImagePolicy) -> bytes:
    """The body of an http(s) URL under the policy's limits."""
    try:
        return await asyncio.wait_for(_fetch(url, policy), policy.timeout)
    except asyncio.TimeoutError:
        raise ImageInputError(f"fetching the image timed out after {policy.timeout:g} s") from None
    except httpx.HTTPError as err:
        raise ImageInputError(f"cannot fetch the image: {type(err).__name__}: {err}") from None


async def _fetch(url: str, policy: ImagePolicy) -> bytes:
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=policy.timeout) as client:
        for _ in range(policy.max_redirects + 1):
            target, host, headers = await _pinned(url, policy)
            request = client.build_request("GET", target, headers=headers, extensions={"sni_hostname": host})
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect and "location" in response.headers:
                    url = urllib.parse.urljoin(url, response.headers["location"])
                    continue
                return await _read_body(response, policy)
            finally:
                await response.aclose()
    raise ImageInputError(f"the image URL redirects more than {policy.max_redirects} times")


async def _read_body(response: httpx.Response, policy: ImagePolicy) -> bytes:
    if response.status_code != 200:
        raise ImageInputError(f"the image URL answered HTTP {response.status_code}")
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith("image/"):
        raise ImageInputError(f"the image URL's content type is {kind or 'missing'!r}, not image/*")
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise ImageInputError(f"the image is larger than the limit of {policy.max_bytes} bytes", status=413)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > policy.max_bytes:
            raise ImageInputError(f"the image is larger than the limit of {policy.max_bytes} bytes", status=413)
    return bytes(body)


async def _pinned(url: str, policy: ImagePolicy) -> tuple[httpx.URL, str, dict[str, str]]:
    """(the URL with its host replaced by a checked address, the host name, the Host header)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as err:
        raise ImageInputError(f"not a valid image URL: {err}") from None
    if parsed.scheme not in ("http", "https"):
        raise ImageInputError(f"image URLs must be data:, http: or https:, got {parsed.scheme or 'no'} scheme")
    host = parsed.host
    if not host:
        raise ImageInputError("the image URL has no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ImageInputError(f"cannot resolve the image URL's host {host!r}: {err}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not policy.allow_private:
        for address in addresses:
            if not _public(address):
                raise ImageInputError(f"the image URL's host {host!r} resolves to the non-public address "
                                      f"{address}; the server refuses those (see --allow-private-image-urls)")
    netloc = host if parsed.port is None else f"{host}:{parsed.port}"
    return parsed.copy_with(host=str(addresses[0])), host, {"Host": netloc}


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_global and not address.is_multicast
