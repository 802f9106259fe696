"""Remote images for engines that cannot fetch them: the gateway fetches and inlines them.

OpenAI clients mostly send images as `http(s)://` URLs. vLLM and SGLang fetch those
themselves; the llama.cpp inside xllamacpp cannot (it answers a 500). For such a model the
gateway that took the client's request fetches each remote image and replaces its URL with
a `data:` URL before forwarding (a peer's gateway gets the inlined body, signed as it is).

Fetching a URL the client names is a request made from inside the cluster, so it is bounded:
http and https only; every address the host resolves to is checked, and the connection goes
to a checked address (a second DNS answer cannot swap in another one); under the default
policy (`public`) loopback, link-local (cloud metadata at 169.254.169.254), unspecified and
multicast addresses are refused; redirects are followed at most 3 times, each hop checked
again; the answer must be an image (its Content-Type, or its first bytes when the type is
missing or generic), at most `max_bytes`, read as it comes and dropped past the bound; all
of a request's images arrive within one timeout; the images together must leave the request
under the largest body a gateway takes. Every refusal is an `ImageRefused`: the client's 400
naming the content part.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from ..errors import openai_error
from .endpoints import exact_payload

__all__ = ["IMAGE_FETCH_MODES", "ImageFetcher", "ImageRefused", "RemoteImage",
           "address_allowed", "image_type", "remote_images"]

IMAGE_FETCH_MODES = ("off", "public", "any")
_IMAGE_PARTS = frozenset({"image_url", "input_image"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 3
_REQUEST_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity",
                    "User-Agent": "gpumesh-gateway"}
_IMAGE_TYPE = re.compile(r"image/[a-z0-9][a-z0-9.+-]*")
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


class ImageRefused(Exception):
    """A remote image the gateway will not inline: the client's 400."""

    def __init__(self, message: str, code: str, param: str) -> None:
        super().__init__(message)
        self.code = code
        self.param = param

    def response(self) -> web.Response:
        return openai_error(400, str(self), code=self.code, param=self.param)


class _Failed(Exception):
    """Why one fetch failed (the caller names the part and the URL)."""

    def __init__(self, why: str, code: str = "image_fetch_failed") -> None:
        super().__init__(why)
        self.code = code


@dataclass(frozen=True, slots=True)
class RemoteImage:
    message: int
    part: int
    url: str

    @property
    def param(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


def remote_images(payload: dict[str, Any]) -> list[RemoteImage]:
    """The image parts of a chat request whose URL is http(s), in order. A plain-string
    content (the common case) is skipped without a look at its text."""
    messages = payload.get("messages")
    if type(messages) is not list:
        return []
    found = []
    for i, message in enumerate(messages):
        content = message.get("content") if type(message) is dict else None
        if type(content) is not list:
            continue
        for j, part in enumerate(content):
            url = _url_of(part)
            if url is not None and url[:8].lower().startswith(("http://", "https://")):
                found.append(RemoteImage(i, j, url))
    return found


def _url_of(part: Any) -> str | None:
    """The URL of an image part: `{"image_url": {"url": ...}}`, or `{"image_url": "..."}`
    as the Responses API's `input_image` (sent to chat by some clients) spells it."""
    if type(part) is not dict or part.get("type") not in _IMAGE_PARTS:
        return None
    image = part.get("image_url")
    url = image.get("url") if type(image) is dict else image
    return url if type(url) is str else None


def _set_url(payload: dict[str, Any], image: RemoteImage, url: str) -> None:
    part = payload["messages"][image.message]["content"][image.part]
    if type(part["image_url"]) is dict:
        part["image_url"]["url"] = url
    else:
        part["image_url"] = url


def address_allowed(address: str) -> bool:
    """Whether the `public` policy lets the gateway connect to `address`: not loopback,
    link-local, unspecified (0.0.0.0/8, ::) or multicast, also when an IPv6 address embeds
    such an IPv4 one (::ffff:127.0.0.1, ::127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif int(ip) >> 32 == 0:                  # ::a.b.c.d (and :: and ::1)
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.version == 4 and ip in _THIS_NETWORK:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")    # connecting to it reaches this host


def image_type(content_type: str | None, head: bytes) -> str | None:
    """The media type of a fetched answer if it is an image, else None: the Content-Type
    when it says image/*, the magic bytes (PNG, JPEG, GIF, WebP) when it says nothing or
    only 'bytes'."""
    declared = (content_type or "").partition(";")[0].strip().lower()
    if _IMAGE_TYPE.fullmatch(declared):
        return declared
    if declared not in _GENERIC_TYPES:
        return None
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


class _Budget:
    """The bytes a request's images may still take, all fetches together: what keeps the
    inlined request under the largest body a gateway (this one, or a peer) takes."""

    def __init__(self, body_bytes: int, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self.left = (max_body_bytes - body_bytes) * 3 // 4     # base64 makes 4 of 3

    def take(self, count: int) -> bool:
        self.left -= count
        return self.left >= 0


class _PinnedResolver(AbstractResolver):
    """Answers with the addresses already checked, whatever DNS would say now."""

    def __init__(self, addresses: list[tuple[int, str]]) -> None:
        self._addresses = addresses

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0,
                              flags=flags) for fam, address in self._addresses]

    async def close(self) -> None:
        pass


class ImageFetcher:
    """Inlines the remote images of chat requests under one policy and its bounds."""

    def __init__(self, mode: str = "public", *, max_bytes: int = 20 << 20,
                 timeout_s: float = 10.0, max_images: int = 8) -> None:
        if mode not in IMAGE_FETCH_MODES:
            raise ValueError(f"image fetch mode must be one of {IMAGE_FETCH_MODES}: {mode!r}")
        self.mode = mode
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_images = max_images

    async def inline(self, body: bytes, payload: dict[str, Any], max_body_bytes: int) -> bytes:
        """`body` with each remote image URL replaced by a data: URL (re-encoded from an
        exact parse), or `body` itself when it has none; raises ImageRefused."""
        if not remote_images(payload):
            return body
        # Found again in the exact parse, which is the one re-encoded.
        exact = exact_payload(body)
        images = remote_images(exact)
        if not images:
            return body
        first = images[0]
        if self.mode == "off":
            raise ImageRefused(f"{first.param}: this gateway does not fetch image URLs "
                               "(--image-fetch off): send the image inline as a data: URL "
                               "(data:image/png;base64,...)", "image_url_not_allowed",
                               first.param)
        if len(images) > self.max_images:
            extra = images[self.max_images]
            raise ImageRefused(f"{extra.param}: at most {self.max_images} image URLs per "
                               "request are fetched; send more as data: URLs",
                               "too_many_images", extra.param)
        budget = _Budget(len(body), max_body_bytes)
        data_urls = await self._fetch_all(images, budget)
        for image in images:
            _set_url(exact, image, data_urls[image.url])
        inlined = json.dumps(exact, separators=(",", ":")).encode()
        if len(inlined) > max_body_bytes:
            raise ImageRefused(_too_large_for_body(max_body_bytes), "image_too_large",
                               first.param)
        return inlined

    async def _fetch_all(self, images: list[RemoteImage], budget: _Budget) -> dict[str, str]:
        """url -> data: URL for each distinct URL, fetched at once, within one timeout."""
        firsts: dict[str, RemoteImage] = {}          # a URL given twice is fetched once
        for image in images:
            firsts.setdefault(image.url, image)
        tasks = {url: asyncio.ensure_future(self._fetch(image, budget))
                 for url, image in firsts.items()}
        try:
            async with asyncio.timeout(self.timeout_s):
                return dict(zip(tasks, await asyncio.gather(*tasks.values())))
        except TimeoutError:
            late = next((firsts[url] for url, task in tasks.items()
                         if task.cancelled() or not task.done()), images[0])
            raise ImageRefused(f"{late.param}: the image at {_short(late.url)} did not arrive "
                               f"within {self.timeout_s:g} s", "image_fetch_failed",
                               late.param) from None
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def _fetch(self, image: RemoteImage, budget: _Budget) -> str:
        try:
            kind, data = await self._follow(image.url, budget)
        except _Failed as failed:
            raise ImageRefused(f"{image.param}: the image at {_short(image.url)}: {failed}",
                               failed.code, image.param) from None
        return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"

    async def _follow(self, url: str, budget: _Budget) -> tuple[str, bytes]:
        """Fetch `url`, following at most 3 redirects, each hop's address checked."""
        for _ in range(_MAX_REDIRECTS + 1):
            target = _http_url(url)
            addresses = await self._checked_addresses(target)
            try:
                async with _pinned_session(addresses) as session, \
                        session.get(target, allow_redirects=False,
                                    headers=_REQUEST_HEADERS) as answer:
                    location = answer.headers.get("Location")
                    if answer.status in _REDIRECTS and location:
                        url = str(target.join(URL(location)))
                        continue
                    if answer.status != 200:
                        raise _Failed(f"answered HTTP {answer.status}")
                    return await self._read_image(answer, budget)
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                raise _Failed(f"could not be fetched ({type(exc).__name__}: {exc})") from None
        raise _Failed(f"more than {_MAX_REDIRECTS} redirects")

    async def _checked_addresses(self, target: URL) -> list[tuple[int, str]]:
        """Every address the host resolves to, once; all must pass the policy."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _Failed(f"its host could not be resolved ({exc})") from None
        addresses = list(dict.fromkeys((info[0], info[4][0]) for info in infos))
        if self.mode == "public":
            for _, address in addresses:
                if not address_allowed(address):
                    raise _Failed(f"its host resolves to {address}, which this gateway does "
                                  "not connect to (loopback, link-local, unspecified or "
                                  "multicast; --image-fetch any allows it)",
                                  "image_url_not_allowed")
        return addresses

    async def _read_image(self, answer: aiohttp.ClientResponse,
                          budget: _Budget) -> tuple[str, bytes]:
        declared = answer.headers.get("Content-Type")
        media_type = (declared or "").partition(";")[0].strip().lower()
        if not _IMAGE_TYPE.fullmatch(media_type) and media_type not in _GENERIC_TYPES:
            raise _Failed(f"answered {media_type}, not an image")   # before reading it
        encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise _Failed(f"answered with Content-Encoding {encoding} (identity was asked)")
        if answer.content_length is not None and answer.content_length > self.max_bytes:
            raise self._too_large(answer.content_length)
        data = bytearray()
        while chunk := await answer.content.readany():
            data += chunk
            if len(data) > self.max_bytes:
                raise self._too_large()
            if not budget.take(len(chunk)):
                raise _Failed(_too_large_for_body(budget.max_body_bytes), "image_too_large")
        kind = image_type(declared, bytes(data[:12]))
        if kind is None:
            raise _Failed("answered bytes that are not a PNG, JPEG, GIF or WebP image")
        return kind, bytes(data)

    def _too_large(self, size: int | None = None) -> _Failed:
        told = "" if size is None else f" ({_size(size)})"
        return _Failed(f"is larger{told} than the {_size(self.max_bytes)} fetched per image",
                       "image_too_large")


def _http_url(url: str) -> URL:
    try:
        target = URL(url)
    except (ValueError, TypeError) as exc:
        raise _Failed(f"is not a valid URL ({exc})") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise _Failed("is not an http(s) URL with a host", "image_url_not_allowed")
    return target


def _pinned_session(addresses: list[tuple[int, str]]) -> aiohttp.ClientSession:
    """A session that connects only to `addresses`, never pools, keeps no cookies and reads
    no proxy from the environment; the caller's timeout bounds it."""
    connector = aiohttp.TCPConnector(resolver=_PinnedResolver(addresses),
                                     use_dns_cache=False, force_close=True, limit=1)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                 cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=None))


def _too_large_for_body(max_body_bytes: int) -> str:
    return (f"the images inlined would make the request larger than the largest body a "
            f"gateway takes ({_size(max_body_bytes)}, --max-body-mib): send smaller images")


def _size(size: int) -> str:
    return f"{size / (1 << 20):.3g} MiB" if size >= 1 << 20 else f"{size / 1024:.3g} KiB"


def _short(url: str) -> str:
    return url if len(url) <= 200 else url[:197] + "..."
