"""Images the robot sends: checked as input (`check_image_source`), then loaded (`load_image`) from a data URL,
bare base64 or an http(s) URL, always as JPG/PNG bytes of at most WeCom's 2 MB.

Image URLs come from API callers, so fetching one is a request the server makes on their behalf. `ImageFetcher`
therefore connects only to addresses it has checked: its httpcore network backend resolves the host itself,
refuses the name when any of its addresses is not public (unless private hosts are allowed), and connects to the
address it checked, so a DNS answer that changes between the check and the connect (rebinding) changes nothing.
TLS still verifies the certificate against the URL's host name, because httpcore passes that name as the SNI /
`server_hostname` after our `connect_tcp` returns. Redirects are followed here (at most 3), each hop checked again.
Environment proxies are not used for images: a proxy would resolve the name itself, out of our sight.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from typing import Literal
from urllib.parse import urlsplit

import httpcore
import httpx
import idna

logger = logging.getLogger(__name__)

IMAGE_MAX_BYTES = 2 * 1024 * 1024
URL_MAX_CHARS = 2048
# A data URL's base64 text for IMAGE_MAX_BYTES, plus room for the `data:image/jpeg;base64,` prefix.
DATA_URL_MAX_CHARS = (IMAGE_MAX_BYTES + 2) // 3 * 4 + 64
DOWNLOAD_TIMEOUT = 20.0
CONNECT_TIMEOUT = 5.0
MAX_REDIRECTS = 3
DATA_URL_MIMES = frozenset({"image/png", "image/jpeg", "image/jpg"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the host's addresses, as text. The default asks the system resolver off the event loop.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
AddressKind = Literal["public", "private", "forbidden"]

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ImageError(ValueError):
    """An image we cannot send: unreadable, not JPG/PNG, over WeCom's 2 MB, or a URL we will not fetch."""


class ImageSourceRefused(ImageError):
    """An image URL whose host resolves to an address this process may not fetch from (SSRF protection)."""


# --- bytes -------------------------------------------------------------------------------------------------------


def image_kind(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    return None


def check_image(data: bytes) -> bytes:
    if not data:
        raise ImageError("图片为空")
    if len(data) > IMAGE_MAX_BYTES:
        raise ImageError(f"图片 {len(data) / 1024 / 1024:.1f} MB，超过企业微信的 2 MB 上限")
    if image_kind(data) is None:
        raise ImageError("只能发送 JPG 或 PNG 图片")
    return data


def to_data_url(data: bytes) -> str:
    mime = "image/png" if image_kind(data) == "png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _b64decode(text: str) -> bytes:
    if len(text) > DATA_URL_MAX_CHARS:
        raise ImageError("图片超过企业微信的 2 MB 上限")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: text that is not ASCII
        raise ImageError("图片不是有效的 base64 / data URL") from exc


def decode_data_url(src: str) -> bytes:
    """`data:image/png;base64,...` (PNG or JPEG) or bare base64 -> bytes, not yet checked for kind and size."""
    if src[:5].lower() != "data:":
        return _b64decode(src)
    header, sep, payload = src[5:].partition(",")
    if not sep:
        raise ImageError("data URL 缺少逗号分隔的数据部分")
    mime, *params = (part.strip().lower() for part in header.split(";"))
    if "base64" not in params:
        raise ImageError("data URL 必须是 base64 编码（data:image/png;base64,...）")
    if mime not in DATA_URL_MIMES:
        raise ImageError("只能发送 JPG 或 PNG 图片：data URL 应为 image/png 或 image/jpeg")
    return _b64decode(payload)


# --- sources as input ----------------------------------------------------------------------------------------------


def _ascii_host(host: str) -> str:
    """The host as it goes on the wire (IDNA for names), or ImageError. IP literals come back unchanged."""
    if not host:
        raise ImageError("图片地址缺少主机名")
    if ":" in host:  # urlsplit strips the brackets of an IPv6 literal
        if "%" in host:
            raise ImageError("图片地址的 IPv6 主机不能带接口标识（%）")
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError as exc:
            raise ImageError("图片地址的 IPv6 主机不合法") from exc
    name = host.rstrip(".")
    if len(name) > 253:
        raise ImageError("图片地址的主机名太长")
    labels = name.split(".")
    try:
        ipaddress.IPv4Address(name)
        return name
    except ValueError:
        pass
    if labels[-1].isdigit():
        # `2130706433`, `0177.1`: numeric forms some resolvers read as an address; never a DNS name.
        raise ImageError("图片地址的主机名不合法（数字形式的地址请写成 a.b.c.d）")
    encoded: list[str] = []
    for label in labels:
        try:
            if not label.isascii():
                label = idna.encode(label, uts46=True).decode("ascii")
            elif label.lower().startswith("xn--"):
                idna.decode(label)  # a punycode label must decode (`xn--a` does not)
        except (idna.IDNAError, UnicodeError) as exc:
            raise ImageError("图片地址的主机名不是合法的国际化域名") from exc
        if not _LABEL.fullmatch(label.lower()):
            raise ImageError("图片地址的主机名不合法")
        encoded.append(label.lower())
    return ".".join(encoded)


def _check_url(src: str) -> httpx.URL:
    if len(src) > URL_MAX_CHARS:
        raise ImageError(f"图片地址太长（最多 {URL_MAX_CHARS} 个字符）")
    if _SURROGATE.search(src):
        raise ImageError("图片地址含有无效的 Unicode 字符")
    if _CONTROL.search(src):
        raise ImageError("图片地址含有控制字符")
    try:
        parts = urlsplit(src)
    except ValueError as exc:  # e.g. an unclosed `[` in the host
        raise ImageError("图片地址无法解析") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise ImageError("图片地址只能是 http(s) URL 或 data:image/... URL")
    if "@" in parts.netloc:
        raise ImageError("图片地址不能包含用户名或密码")
    if "\\" in parts.netloc:
        raise ImageError("图片地址的主机部分不合法")
    try:
        port = parts.port
    except ValueError as exc:
        raise ImageError("图片地址的端口不合法（应为 1–65535）") from exc
    if port == 0:
        raise ImageError("图片地址的端口不合法（应为 1–65535）")
    host = _ascii_host(parts.hostname or "")
    try:
        url = httpx.URL(src)
    except (httpx.InvalidURL, ValueError) as exc:  # idna's errors are ValueErrors
        raise ImageError("图片地址无法解析") from exc
    if _wire_host(url) != host:
        # Our reading and httpx's differ: refuse rather than fetch something other than what was checked.
        raise ImageError("图片地址无法解析")
    return url


def _wire_host(url: httpx.URL) -> str:
    host = url.raw_host.decode("ascii").rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def check_image_source(src: str) -> str:
    """An image as `/api/send` takes it: a JPG/PNG data URL of at most 2 MB, or an http(s) URL that parses.

    Returns `src` unchanged; raises ImageError (a ValueError) with a sentence for the caller. Whether the URL's host
    may be fetched from is decided when it is fetched (`ImageFetcher`): that needs DNS."""
    if not isinstance(src, str):
        raise ImageError("图片必须是字符串：data:image/...;base64,... 或 http(s) URL")
    scheme = src[:8].lower()
    if scheme.startswith("data:"):
        if len(src) > DATA_URL_MAX_CHARS:
            raise ImageError("图片超过企业微信的 2 MB 上限")
        check_image(decode_data_url(src))
        return src
    if scheme.startswith(("http://", "https://")):
        _check_url(src)
        return src
    raise ImageError("图片只能是 data:image/...;base64,... 或 http(s) URL")


# --- which addresses may be fetched from -----------------------------------------------------------------------------


def address_kind(ip: IPAddress) -> AddressKind:
    """public: fetch; private: fetch only when private hosts are allowed; forbidden: never.

    Never, even for intranet setups: link-local (cloud metadata at 169.254.169.254, fe80::/10), unspecified and
    `0.0.0.0/8` (they mean this host), multicast, and reserved ranges."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_kind(embedded)
        if ip.is_site_local:
            return "private"
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip in _THIS_NETWORK:
        return "forbidden"
    if ip.is_loopback:
        return "private"
    if ip.is_reserved:
        return "forbidden"
    if ip.is_global and ip not in _CGNAT:
        return "public"
    return "private"  # RFC 1918, CGNAT 100.64/10, unique local fc00::/7, documentation and benchmark ranges


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _parse_address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise ImageSourceRefused("图片地址的主机解析出了无法识别的地址") from exc


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address of the name, then connects to a checked address (never by name)."""

    def __init__(
        self, *, allow_private: bool, resolver: Resolver, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._allow_private = allow_private
        self._resolver = resolver
        self._inner = inner or httpcore.AnyIOBackend()

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            found = await self._resolver(host, port)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            raise ImageError(f"无法解析图片地址的主机名 {host}，请检查地址是否正确") from exc
        addresses = list(dict.fromkeys(_parse_address(text) for text in found))
        if not addresses:
            raise ImageError(f"无法解析图片地址的主机名 {host}，请检查地址是否正确")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._addresses(host, port)
        # One refused address refuses the name: an attacker's DNS may answer public and private addresses at once.
        for ip in addresses:
            kind = address_kind(ip)
            if kind == "public" or (kind == "private" and self._allow_private):
                continue
            logger.warning("image fetch refused: host %s resolves to %s (%s)", host, ip, kind)
            if kind == "private":
                raise ImageSourceRefused(
                    f"图片地址的主机 {host} 指向内网或本机地址，默认不下载；"
                    "图片放在内网服务器上时请设置 HIL_IMAGE_ALLOW_PRIVATE=true"
                )
            raise ImageSourceRefused(f"图片地址的主机 {host} 指向不允许访问的地址（链路本地、组播或保留地址）")
        last: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise ImageSourceRefused("图片不能从本机套接字下载")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# --- fetching -------------------------------------------------------------------------------------------------------


class ImageFetcher:
    """Downloads image URLs: public hosts only unless `allow_private`, at most `timeout` seconds in all (redirects
    and body included), the 2 MB cap enforced while reading. One per process; each fetch opens its own connections
    and closes them, so nothing stays connected to a host an API caller chose."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        timeout: float = DOWNLOAD_TIMEOUT,
        max_redirects: int = MAX_REDIRECTS,
        resolver: Resolver = system_resolver,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_redirects = max_redirects
        self._backend = GuardedNetworkBackend(allow_private=allow_private, resolver=resolver, inner=network_backend)
        self._ssl_context = ssl_context

    async def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # certifi's CAs, as the rest of the process uses; loading them reads a file, so not on the loop.
            self._ssl_context = await asyncio.to_thread(httpx.create_ssl_context)
        return self._ssl_context

    async def fetch(self, src: str) -> bytes:
        """GET an http(s) image URL -> checked JPG/PNG bytes; ImageError for anything else."""
        url = _check_url(src)
        try:
            async with asyncio.timeout(self.timeout):
                for _ in range(self.max_redirects + 1):
                    result = await self._get(url)
                    if isinstance(result, bytes):
                        return result
                    url = result
        except TimeoutError as exc:
            raise ImageError(f"下载图片超时（{self.timeout:.3g} 秒内没有下载完）：{url.host}") from exc
        raise ImageError(f"下载图片失败：重定向超过 {self.max_redirects} 次")

    async def _get(self, url: httpx.URL) -> httpx.URL | bytes:
        """One hop: the image's bytes, or where a redirect points (checked as input again)."""
        ssl_context = await self._ssl() if url.scheme == "https" else None
        core_url = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
        headers = [
            (b"Host", url.netloc),
            (b"Accept", b"image/png, image/jpeg"),
            (b"Accept-Encoding", b"identity"),
            (b"User-Agent", b"hil-mcp"),
        ]
        extensions = {"timeout": {"connect": min(CONNECT_TIMEOUT, self.timeout)}}
        try:
            # A pool per hop: each hop may be another host, and nothing stays connected after the fetch.
            async with (
                httpcore.AsyncConnectionPool(ssl_context=ssl_context, network_backend=self._backend) as pool,
                pool.stream("GET", core_url, headers=headers, extensions=extensions) as response,
            ):
                if response.status in REDIRECT_STATUSES:
                    return _redirect_target(url, response)
                if response.status != 200:
                    raise ImageError(f"下载图片失败：{url.host} 返回 HTTP {response.status}")
                return check_image(await _read_capped(response))
        except (
            httpcore.TimeoutException,
            httpcore.NetworkError,
            httpcore.ProtocolError,
            httpcore.UnsupportedProtocol,
        ) as exc:
            raise ImageError(f"下载图片失败：无法从 {url.host} 读取（{type(exc).__name__}）") from exc


def _redirect_target(url: httpx.URL, response: httpcore.Response) -> httpx.URL:
    location = next((value for name, value in response.headers if name.lower() == b"location"), None)
    if location is None:
        raise ImageError(f"下载图片失败：{url.host} 返回 HTTP {response.status} 但没有 Location")
    try:
        target = url.join(location.decode("utf-8"))
    except (httpx.InvalidURL, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise ImageError("下载图片失败：重定向地址无法解析") from exc
    try:
        return _check_url(str(target))
    except ImageError as exc:
        raise ImageError(f"下载图片失败：重定向到不能下载的地址（{exc}）") from exc


async def _read_capped(response: httpcore.Response) -> bytes:
    length = next((v.decode("latin-1") for name, v in response.headers if name.lower() == b"content-length"), None)
    return await read_capped(response.aiter_stream(), length, IMAGE_MAX_BYTES, "企业微信的 2 MB ", ImageError)


async def read_capped(
    body: AsyncIterable[bytes],
    content_length: str | None,
    max_bytes: int,
    limit: str,
    error: Callable[[str], Exception],
) -> bytes:
    """A downloaded picture's bytes, at most `max_bytes`: a larger one (by its Content-Length, or as it arrives)
    raises `error` with a message that names the limit as `limit` ("企业微信的 2 MB ")."""
    if content_length is not None and content_length.strip().isdigit() and int(content_length) > max_bytes:
        raise error(f"图片 {int(content_length) / 1024 / 1024:.1f} MB，超过{limit}上限")
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > max_bytes:
            raise error(f"图片超过{limit}上限")
        chunks.append(chunk)
    return b"".join(chunks)


async def load_image(src: str | bytes, fetcher: ImageFetcher | None = None) -> bytes:
    """An image given as bytes, a data URL, bare base64 or an http(s) URL -> checked JPG/PNG bytes.

    URLs are fetched with `fetcher` (default: public hosts only). Raises ImageError and nothing else."""
    if isinstance(src, bytes):
        return check_image(src)
    if not isinstance(src, str):
        raise ImageError("图片必须是字符串或字节")
    if src[:8].lower().startswith(("http://", "https://")):
        return await (fetcher or ImageFetcher()).fetch(src)
    return check_image(decode_data_url(src))


async def load_images(sources: Iterable[str | bytes], fetcher: ImageFetcher | None = None) -> list[bytes]:
    """Every image of one message, within one download bound in all (the fetcher's timeout)."""
    fetcher = fetcher or ImageFetcher()
    try:
        async with asyncio.timeout(fetcher.timeout):
            return [await load_image(src, fetcher) for src in sources]
    except TimeoutError as exc:
        raise ImageError(f"下载图片超时（{fetcher.timeout:.3g} 秒内没有下载完）") from exc
