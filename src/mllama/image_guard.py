"""Guarded image input for the library's `load_image`: URLs, local files and bytes under limits.

URLs (http/https, scheme case-insensitive) are fetched only from public addresses unless
`allow_private`: every address the host resolves to must be global, and the connection goes to the
address that was checked (the name is kept for the Host header, SNI and the certificate), so a
second DNS answer cannot point the fetch elsewhere. Redirects are checked the same way. The whole
fetch has one deadline, the body a byte limit enforced while streaming, and the first bytes must be
one of the accepted image formats before the rest is read. Images are opened only as
ACCEPTED_FORMATS (not every format PIL registers: EPS, for one, runs Ghostscript), and refused above
a pixel budget before their pixels are decoded. Uses only the standard library; the server runs the
same fetch in worker threads (mllama.image_fetch). Every refusal is an ImageInputError, a ValueError
whose `status` is 413 for an image over a size limit and 400 otherwise (the server's HTTP status).
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ACCEPTED_FORMATS", "ImageInputError", "ImageLimits", "default_limits", "fetch_image_bytes", "is_url",
           "open_limited"]

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


class ImageInputError(ValueError):
    """An image that cannot be used; `status` is 413 when it is too large, else 400."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    """max_pixels: width * height above which an image is refused (raise it for huge scans; the
    default can be set with MLLAMA_MAX_IMAGE_PIXELS). max_bytes: largest URL download. timeout: the
    deadline of a whole URL fetch, redirects included. allow_private: fetch from loopback, private and
    link-local addresses too. allow_local: read local paths (the library default; the server refuses)."""

    max_pixels: int = 40_000_000
    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 10.0
    max_redirects: int = 3
    allow_private: bool = False
    allow_local: bool = True


def default_limits(*, timeout: float = 10.0) -> ImageLimits:
    raw = os.environ.get("MLLAMA_MAX_IMAGE_PIXELS")
    if raw is None:
        return ImageLimits(timeout=timeout)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"MLLAMA_MAX_IMAGE_PIXELS must be a positive integer, got {raw!r}")
    return ImageLimits(timeout=timeout, max_pixels=int(raw))


def is_url(text: str) -> bool:
    return text[:8].lower().startswith(("http://", "https://"))


def sniff_format(head: bytes) -> str | None:
    """The accepted format whose signature `head` starts with (WebP: RIFF....WEBP), else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def open_limited(source: bytes | Path, *, what: str, limits: ImageLimits) -> Image.Image:
    """Identify (header only), check the pixel budget, then decode; EXIF orientation applied, RGB."""
    handle: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    try:
        try:
            image = Image.open(handle, formats=ACCEPTED_FORMATS)
        except UnidentifiedImageError:
            raise ImageInputError(f"{what} is not a readable image: not an image in an accepted format "
                                  f"({', '.join(ACCEPTED_FORMATS)})") from None
        except Image.DecompressionBombError as err:
            raise ImageInputError(f"{what} is too large: {err}", status=413) from None
        except (OSError, SyntaxError, ValueError) as err:  # a truncated or malformed header
            raise ImageInputError(f"{what} is not a readable image: {err}") from None
        pixels = image.width * image.height
        if pixels > limits.max_pixels:
            raise ImageInputError(f"{what} has {image.width}x{image.height} = {pixels} pixels, more than the budget "
                                  f"of {limits.max_pixels} (raise it with ImageLimits(max_pixels=...) or "
                                  "MLLAMA_MAX_IMAGE_PIXELS)", status=413)
        try:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
        except Image.DecompressionBombError as err:
            raise ImageInputError(f"{what} is too large: {err}", status=413) from None
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageInputError(f"{what} is not a readable image: {err}") from None
    finally:
        handle.close()


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_global and not (mapped or address).is_multicast


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the host name for SNI and the certificate."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def _lookup(host: str, port: int, timeout: float) -> list:
    """getaddrinfo bounded by `timeout`: a resolver that hangs (its own timeouts can add up to
    minutes) must not hold the fetch past its deadline. The lookup runs on in a daemon thread that
    the process does not wait for; its result is dropped."""
    result: list = []

    def run() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            result.append(err)

    worker = threading.Thread(target=run, name="mllama-dns", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise TimeoutError(f"looking up {host!r} took longer than {timeout:.3g} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _resolve(url: str, limits: ImageLimits, timeout: float) -> tuple[urllib.parse.SplitResult, str]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageInputError(f"image URLs must be http: or https:, got {parts.scheme or 'no'} scheme")
    host = parts.hostname
    if not host:
        raise ImageInputError(f"the image URL {url!r:.100} has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
        infos = _lookup(host, port, timeout)
    except TimeoutError:
        raise
    except (socket.gaierror, UnicodeError, ValueError) as err:
        raise ImageInputError(f"cannot resolve the image URL's host {host!r}: {err}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not limits.allow_private:
        for address in addresses:
            if not _public(address):
                raise ImageInputError(f"the image URL's host {host!r} resolves to the non-public address {address}, "
                                      "which is refused unless allowed (ImageLimits(allow_private=True); "
                                      "mllama serve --allow-private-image-urls)")
    return parts._replace(scheme=scheme), str(addresses[0])


def fetch_image_bytes(url: str, limits: ImageLimits, *, deadline: float | None = None) -> bytes:
    """The body of an image URL, under one deadline, a byte limit and a format check on its first bytes.
    deadline: a time.monotonic() value to use instead of now + limits.timeout (a fetch that waited in a
    queue keeps the deadline of its request)."""
    deadline = time.monotonic() + limits.timeout if deadline is None else deadline

    def timed_out() -> ImageInputError:
        return ImageInputError(f"fetching {url!r:.100} took longer than {limits.timeout:g} s")

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out()
        return left

    for _ in range(limits.max_redirects + 1):
        try:
            parts, address = _resolve(url, limits, remaining())
        except TimeoutError:
            raise timed_out() from None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        cls = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
        conn = cls(parts.hostname or "", address, port, remaining())
        try:
            path = parts.path or "/"
            conn.request("GET", path + (f"?{parts.query}" if parts.query else ""), headers={"User-Agent": "mllama"})
            sock = conn.sock  # kept: the connection drops it once a Connection: close response is read
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("location"):
                url = urllib.parse.urljoin(url, response.getheader("location"))
                continue
            if response.status != 200:
                raise ImageInputError(f"{url!r:.100} answered HTTP {response.status}")
            declared = response.getheader("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageInputError(f"{url!r:.100} is larger than the limit of {limits.max_bytes} bytes", status=413)
            body = bytearray()
            while True:
                sock.settimeout(remaining())  # type: ignore[union-attr]
                chunk = response.read1(min(65536, limits.max_bytes + 1 - len(body)) or 1)  # one recv: deadline checked
                if not chunk:
                    break
                body += chunk
                if len(body) > limits.max_bytes:
                    raise ImageInputError(f"{url!r:.100} is larger than the limit of {limits.max_bytes} bytes",
                                          status=413)
                if len(body) >= 12 and len(body) - len(chunk) < 12 and sniff_format(bytes(body[:12])) is None:
                    raise ImageInputError(f"{url!r:.100} is not an image in an accepted format "
                                          f"({', '.join(ACCEPTED_FORMATS)})")
                remaining()
            return bytes(body)
        except TimeoutError:
            raise timed_out() from None
        except (OSError, http.client.HTTPException) as err:
            raise ImageInputError(f"could not download {url!r:.100}: {err}") from None
        finally:
            conn.close()
    raise ImageInputError(f"{url!r:.100} redirects more than {limits.max_redirects} times")
