"""hil_protocol.images: image sources checked as input, fetched within bounds, and never from a private address
unless allowed (SSRF). Every fetch here goes to a tiny server on 127.0.0.1; names resolve through an injected
resolver, and a dialer connects to that server whatever address was checked, so no test leaves 127.0.0.1."""

from __future__ import annotations

import base64
import ipaddress
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest

from hil_protocol.images import (
    IMAGE_MAX_BYTES,
    URL_MAX_CHARS,
    ImageError,
    ImageFetcher,
    ImageSourceRefused,
    address_kind,
    check_image_source,
    decode_data_url,
    load_image,
    load_images,
    to_data_url,
)
from tests.procs import Stack
from tests.tiny_http import Reply, Seen, TinyHTTP, tls_contexts

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
JPEG = b"\xff\xd8\xff\xe0" + b"\x01\x02" * 300
PUBLIC_IP = "93.184.216.34"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class Resolver:
    """Answers from a table; counts questions. A list of tables answers each question from the next table."""

    def __init__(self, *tables: dict[str, list[str]]) -> None:
        self.tables = list(tables)
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        table = self.tables[min(len(self.asked), len(self.tables) - 1)]
        self.asked.append(host)
        if host not in table:
            raise OSError(f"no such host {host}")
        return table[host]


class Dialer(httpcore.AsyncNetworkBackend):
    """The network under the guard: records which address it was asked to connect to, connects to 127.0.0.1."""

    def __init__(self) -> None:
        self.dialed: list[str] = []
        self._real = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, **_: Any
    ) -> httpcore.AsyncNetworkStream:
        self.dialed.append(host)
        return await self._real.connect_tcp("127.0.0.1", port, timeout)

    async def sleep(self, seconds: float) -> None:
        await self._real.sleep(seconds)


def fetcher(resolver: Resolver, dialer: Dialer | None = None, **kw: object) -> ImageFetcher:
    return ImageFetcher(resolver=resolver, network_backend=dialer or Dialer(), **kw)  # type: ignore[arg-type]


def serve(routes: dict[str, Reply]) -> TinyHTTP:
    return TinyHTTP(lambda seen: routes.get(seen.path, Reply(404)))


# --- check_image_source ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src",
    [
        "https://example.com/a.png",
        "http://example.com:8080/a.png?x=1&y=%20#frag",
        "HTTPS://EXAMPLE.COM/A.PNG",
        "http://例子.测试/图片.png",
        "http://xn--fsqu00a.xn--0zwm56d/x.png",
        "http://127.0.0.1:8080/x.png",  # syntactically fine; whether it may be fetched is decided at fetch time
        "http://[::1]:8080/x.png",
        "http://example.com./x.png",
        data_url(PNG),
        data_url(JPEG, "image/jpeg"),
        data_url(JPEG, "image/jpg"),
        "DATA:IMAGE/PNG;BASE64," + base64.b64encode(PNG).decode(),
    ],
)
def test_check_image_source_accepts(src: str) -> None:
    assert check_image_source(src) == src


@pytest.mark.parametrize(
    ("src", "match"),
    [
        ("http://127.0.0.1:99999/x.png", "端口"),
        ("http://example.com:0/x.png", "端口"),
        ("http://example.com:-1/x.png", "端口"),
        ("http://example.com:8o/x.png", "端口"),
        ("http://xn--a.invalid/x.png", "国际化域名"),
        ("http://a\ud800b.example/x.png", "Unicode"),
        ("http://example.com/\udc80.png", "Unicode"),
        ("http://user:pw@example.com/x.png", "用户名"),
        ("http://user@example.com/x.png", "用户名"),
        ("http://example.com\\@127.0.0.1/x.png", "用户名"),
        ("http://example.com\\.evil/x.png", "主机"),
        ("file:///etc/passwd", "http"),
        ("ftp://example.com/x.png", "http"),
        ("gopher://127.0.0.1:6379/_x", "http"),
        ("javascript:alert(1)", "http"),
        ("//example.com/x.png", "http"),
        ("http:///x.png", "主机"),
        ("http://exa mple.com/x.png", "主机"),
        ("http://example.com/x\n.png", "控制字符"),
        ("http://example.com/x\x00.png", "控制字符"),
        ("http://exa\tmple.com/", "控制字符"),
        ("http://[::1/x.png", "无法解析"),
        ("http://[fe80::1%25eth0]/x.png", "IPv6"),
        ("http://[zz::1]/x.png", "IPv6|无法解析"),
        ("http://2130706433/x.png", "数字"),
        ("http://0x7f.1/x.png", "数字"),
        ("http://127.000.000.001/x.png", "数字"),
        ("http://-bad-.example/x.png", "主机名不合法"),
        ("http://a..b/x.png", "主机名不合法"),
        ("http://" + "a" * 64 + ".example/x.png", "主机名不合法"),
        ("https://example.com/" + "a" * URL_MAX_CHARS, "太长"),
        (data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * IMAGE_MAX_BYTES), "2 MB"),
        ("data:image/png;base64," + "A" * (4 * IMAGE_MAX_BYTES), "2 MB"),
        (data_url(b"GIF89a" + b"\x00" * 100, "image/gif"), "image/png"),
        (data_url(b"GIF89a" + b"\x00" * 100), "JPG"),
        ("data:text/html;base64,PGgxPg==", "image/png"),
        ("data:image/png;base64,@@@not-base64@@@", "base64"),
        ("data:image/png;base64,\ud800", "base64"),
        ("data:image/png,rawbytes", "base64"),
        ("data:image/png;base64", "逗号"),
        ("data:image/png;base64,", "为空"),
        (base64.b64encode(PNG).decode(), "http"),  # bare base64: the relay's upload_image takes it, /api/send not
        ("", "http"),
    ],
)
def test_check_image_source_refuses(src: str, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        check_image_source(src)


def test_check_image_source_refuses_non_strings() -> None:
    with pytest.raises(ImageError):
        check_image_source(b"http://example.com/x.png")  # type: ignore[arg-type]


def test_image_error_is_a_value_error_for_pydantic_validators() -> None:
    assert issubclass(ImageError, ValueError) and issubclass(ImageSourceRefused, ImageError)


def test_oversized_data_url_refused_without_decoding_it() -> None:
    huge = "data:image/png;base64," + "A" * (64 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="2 MB"):
        check_image_source(huge)
    assert time.perf_counter() - start < 0.05


def test_data_url_round_trip() -> None:
    assert decode_data_url(to_data_url(PNG)) == PNG
    assert to_data_url(JPEG).startswith("data:image/jpeg;base64,")


async def test_load_image_refuses_what_check_image_source_refuses() -> None:
    # Nothing is fetched: the resolver would fail the test if it were asked.
    resolver = Resolver({})
    for src in ("http://127.0.0.1:99999/x.png", "http://xn--a.invalid/x.png", "http://a\ud800.example/x.png"):
        with pytest.raises(ImageError):
            await load_image(src, fetcher(resolver))
    assert resolver.asked == []
    assert await load_image(data_url(PNG)) == PNG
    assert await load_image(base64.b64encode(JPEG).decode()) == JPEG  # bare base64 (relay upload_image)
    assert await load_image(PNG) == PNG
    with pytest.raises(ImageError):
        await load_image(123)  # type: ignore[arg-type]


# --- which addresses -----------------------------------------------------------------------------------------------

PRIVATE = [
    "127.0.0.1",
    "127.255.0.9",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "100.64.0.1",
    "100.127.255.254",
    "::1",
    "fc00::1",
    "fd12:3456::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
]
FORBIDDEN = [
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "169.254.169.254",
    "169.254.0.1",
    "fe80::1",
    "::ffff:169.254.169.254",
    "224.0.0.1",
    "ff02::1",
    "240.0.0.1",
    "255.255.255.255",
]


@pytest.mark.parametrize("address", PRIVATE)
def test_private_addresses(address: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) == "private"


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_addresses(address: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) == "forbidden"


@pytest.mark.parametrize("address", [PUBLIC_IP, "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) == "public"


# --- fetching: SSRF ------------------------------------------------------------------------------------------------


async def test_public_host_is_fetched_from_the_checked_address() -> None:
    async with serve({"/pic.png": Reply(body=PNG, headers={"Content-Type": "image/png"})}) as server:
        resolver, dialer = Resolver({"images.test": [PUBLIC_IP]}), Dialer()
        data = await fetcher(resolver, dialer).fetch(f"http://images.test:{server.port}/pic.png")
    assert data == PNG
    assert dialer.dialed == [PUBLIC_IP]
    assert server.seen[0].headers["host"] == f"images.test:{server.port}"


@pytest.mark.parametrize("address", PRIVATE + FORBIDDEN)
async def test_name_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    resolver, dialer = Resolver({"evil.test": [address]}), Dialer()
    with pytest.raises(ImageSourceRefused):
        await fetcher(resolver, dialer).fetch("http://evil.test/x.png")
    assert dialer.dialed == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/x.png",
        "http://10.0.0.1:{port}/x.png",
        "http://[::1]:{port}/x.png",
        "http://[::ffff:127.0.0.1]:{port}/x.png",
        "http://0.0.0.0:{port}/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x.png",
    ],
)
async def test_address_literals_are_checked_too(url: str) -> None:
    resolver, dialer = Resolver({}), Dialer()
    with pytest.raises(ImageSourceRefused):
        await fetcher(resolver, dialer).fetch(url.format(port=8080))
    assert dialer.dialed == [] and resolver.asked == []


async def test_name_with_public_and_private_addresses_is_refused() -> None:
    resolver, dialer = Resolver({"mixed.test": [PUBLIC_IP, "10.0.0.7"]}), Dialer()
    with pytest.raises(ImageSourceRefused, match="HIL_IMAGE_ALLOW_PRIVATE"):
        await fetcher(resolver, dialer).fetch("http://mixed.test/x.png")
    assert dialer.dialed == []


@pytest.mark.parametrize("address", PRIVATE)
async def test_private_addresses_allowed_with_the_setting(address: str) -> None:
    async with serve({"/pic.png": Reply(body=PNG)}) as server:
        resolver, dialer = Resolver({"intranet.test": [address]}), Dialer()
        data = await fetcher(resolver, dialer, allow_private=True).fetch(f"http://intranet.test:{server.port}/pic.png")
    assert data == PNG
    assert dialer.dialed == [str(ipaddress.ip_address(address))]


@pytest.mark.parametrize("address", FORBIDDEN)
async def test_link_local_multicast_and_unspecified_stay_refused_with_the_setting(address: str) -> None:
    resolver, dialer = Resolver({"meta.test": [address]}), Dialer()
    with pytest.raises(ImageSourceRefused, match="不允许"):
        await fetcher(resolver, dialer, allow_private=True).fetch("http://meta.test/x.png")
    assert dialer.dialed == []


async def test_loopback_fetch_for_real_with_the_setting() -> None:
    """The default network backend, a real connection to 127.0.0.1."""
    async with serve({"/pic.jpg": Reply(body=JPEG)}) as server:
        assert await ImageFetcher(allow_private=True).fetch(f"{server.url}/pic.jpg") == JPEG
        with pytest.raises(ImageSourceRefused):
            await ImageFetcher().fetch(f"{server.url}/pic.jpg")
        with pytest.raises(ImageSourceRefused):
            await load_image(f"{server.url}/pic.jpg")  # no fetcher: public only
    assert len(server.seen) == 1


async def test_redirect_from_a_public_host_to_a_private_one_is_refused() -> None:
    routes = {
        "/a.png": Reply(302, headers={"Location": "http://internal.test/secret.png"}),
        "/b.png": Reply(301, headers={"Location": "http://127.0.0.1/secret.png"}),
        "/c.png": Reply(307, headers={"Location": "http://[::ffff:10.0.0.1]/secret.png"}),
    }
    async with serve(routes) as server:
        resolver = Resolver({"public.test": [PUBLIC_IP], "internal.test": ["10.1.1.1"]})
        dialer = Dialer()
        for path in routes:
            with pytest.raises(ImageSourceRefused):
                await fetcher(resolver, dialer).fetch(f"http://public.test:{server.port}{path}")
    assert set(dialer.dialed) == {PUBLIC_IP}


async def test_redirect_to_something_that_is_not_an_image_source_is_refused() -> None:
    routes = {
        "/file": Reply(302, headers={"Location": "file:///etc/passwd"}),
        "/port": Reply(302, headers={"Location": "http://public.test:99999/x.png"}),
        "/user": Reply(302, headers={"Location": "http://u:p@public.test/x.png"}),
        "/none": Reply(302),
    }
    async with serve(routes) as server:
        resolver = Resolver({"public.test": [PUBLIC_IP]})
        for path in routes:
            with pytest.raises(ImageError, match=r"重定向|Location"):
                await fetcher(resolver).fetch(f"http://public.test:{server.port}{path}")


async def test_redirects_followed_at_most_three_times() -> None:
    def handler(seen: Seen) -> Reply:
        hop = int(seen.path.strip("/").split(".")[0])
        if hop == 4:
            return Reply(body=PNG)
        return Reply(302, headers={"Location": f"/{hop + 1}.png"})

    async with TinyHTTP(handler) as server:
        resolver = Resolver({"public.test": [PUBLIC_IP]})
        assert await fetcher(resolver).fetch(f"http://public.test:{server.port}/1.png") == PNG  # 3 redirects
        with pytest.raises(ImageError, match="重定向超过 3 次"):
            await fetcher(resolver).fetch(f"http://public.test:{server.port}/0.png")  # 4 redirects


async def test_each_connection_resolves_once_and_connects_to_what_it_checked() -> None:
    """DNS rebinding: the second answer is private, but the checked address is the one connected to."""
    async with serve({"/pic.png": Reply(body=PNG)}) as server:
        resolver = Resolver({"rebind.test": [PUBLIC_IP]}, {"rebind.test": ["127.0.0.1"]})
        dialer = Dialer()
        assert await fetcher(resolver, dialer).fetch(f"http://rebind.test:{server.port}/pic.png") == PNG
        assert resolver.asked == ["rebind.test"] and dialer.dialed == [PUBLIC_IP]
        # The next fetch asks again, gets the private answer, and is refused before connecting.
        with pytest.raises(ImageSourceRefused):
            await fetcher(resolver, dialer).fetch(f"http://rebind.test:{server.port}/pic.png")
        assert dialer.dialed == [PUBLIC_IP]


async def test_unresolvable_host_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="无法解析"):
        await fetcher(Resolver({})).fetch("http://nowhere.test/x.png")
    with pytest.raises(ImageError, match="无法解析"):
        await fetcher(Resolver({"empty.test": []})).fetch("http://empty.test/x.png")
    with pytest.raises(ImageError):
        await fetcher(Resolver({"odd.test": ["not-an-address"]})).fetch("http://odd.test/x.png")


async def test_tls_verifies_the_url_host_name_while_connecting_to_the_checked_address(tmp_path: Path) -> None:
    server_tls, client_tls = tls_contexts(tmp_path, "images.test")
    async with TinyHTTP(lambda seen: Reply(body=PNG), server_tls) as server:
        resolver = Resolver({"images.test": [PUBLIC_IP], "other.test": [PUBLIC_IP]})
        dialer = Dialer()
        good = ImageFetcher(resolver=resolver, network_backend=dialer, ssl_context=client_tls)
        assert await good.fetch(f"https://images.test:{server.port}/x.png") == PNG
        assert dialer.dialed == [PUBLIC_IP]
        with pytest.raises(ImageError, match=r"other\.test"):  # the certificate is not for other.test
            await good.fetch(f"https://other.test:{server.port}/x.png")


# --- fetching: bounds ----------------------------------------------------------------------------------------------


async def test_dripped_body_is_cut_at_the_total_bound() -> None:
    async with serve({"/slow.png": Reply(body=PNG * 10, drip=0.02)}) as server:
        slow = fetcher(Resolver({"public.test": [PUBLIC_IP]}), timeout=0.3)
        start = time.monotonic()
        with pytest.raises(ImageError, match="超时"):
            await slow.fetch(f"http://public.test:{server.port}/slow.png")
        assert 0.3 <= time.monotonic() - start < 0.5


async def test_server_that_never_answers_is_cut_at_the_total_bound() -> None:
    async with serve({"/hang.png": Reply(hang=True)}) as server:
        slow = fetcher(Resolver({"public.test": [PUBLIC_IP]}), timeout=0.2)
        start = time.monotonic()
        with pytest.raises(ImageError, match="超时"):
            await load_image(f"http://public.test:{server.port}/hang.png", slow)
        assert time.monotonic() - start < 0.4


async def test_all_images_of_a_message_share_one_bound() -> None:
    async with serve({"/slow.png": Reply(body=PNG, drip=0.0005)}) as server:
        slow = fetcher(Resolver({"public.test": [PUBLIC_IP]}), timeout=0.5)
        url = f"http://public.test:{server.port}/slow.png"  # ~0.3 s each
        start = time.monotonic()
        with pytest.raises(ImageError, match="超时"):
            await load_images([url, url, url], slow)
        assert time.monotonic() - start < 0.7


async def test_content_length_over_the_cap_is_refused_before_reading() -> None:
    big = Reply(headers={"Content-Length": str(IMAGE_MAX_BYTES + 1)}, body=PNG, drip=1.0)
    async with serve({"/big.png": big}) as server:
        start = time.monotonic()
        with pytest.raises(ImageError, match="2 MB"):
            await fetcher(Resolver({"public.test": [PUBLIC_IP]})).fetch(f"http://public.test:{server.port}/big.png")
        assert time.monotonic() - start < 0.5


async def test_cap_enforced_while_reading_without_content_length() -> None:
    endless = Reply(body=PNG + b"\x00" * IMAGE_MAX_BYTES, length=False)
    chunked = Reply(body=b"", headers={"Transfer-Encoding": "chunked"}, length=False)
    async with serve({"/endless.png": endless, "/chunked.png": chunked}) as server:
        public = fetcher(Resolver({"public.test": [PUBLIC_IP]}))
        with pytest.raises(ImageError, match="2 MB"):
            await public.fetch(f"http://public.test:{server.port}/endless.png")
        with pytest.raises(ImageError):  # a chunked body that never sends a chunk: a protocol error, typed
            await public.fetch(f"http://public.test:{server.port}/chunked.png")


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (Reply(404), "HTTP 404"),
        (Reply(500, body=b"oops"), "HTTP 500"),
        (Reply(body=b"<html>not an image</html>"), "JPG"),
        (Reply(body=b""), "为空"),
        (Reply(body=b"\x1f\x8b garbage", headers={"Content-Encoding": "gzip"}), "JPG"),
    ],
)
async def test_odd_answers_are_image_errors(reply: Reply, match: str) -> None:
    async with serve({"/x.png": reply}) as server:
        with pytest.raises(ImageError, match=match):
            await fetcher(Resolver({"public.test": [PUBLIC_IP]})).fetch(f"http://public.test:{server.port}/x.png")


async def test_closed_port_is_an_image_error() -> None:
    async with serve({}) as server:
        port = server.port
    with pytest.raises(ImageError, match="无法从"):
        await fetcher(Resolver({"public.test": [PUBLIC_IP]})).fetch(f"http://public.test:{port}/x.png")


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_e2e_image_urls_refused_or_fetched_per_setting(tmp_path: Path) -> None:
    """Relay mode, the worker allowed to fetch from private hosts (the fake on 127.0.0.1); the server in direct mode
    would load it itself. Odd URLs fail that one send and the worker stays connected."""
    stack = Stack(mode="relay", tmp=tmp_path, worker_env={"HIL_IMAGE_ALLOW_PRIVATE": "true"}).start()
    try:
        png_url = httpx.post(f"{stack.fake_url}/_fake/images", files={"file": ("a.png", PNG, "image/png")}).json()
        sent = stack.send("看图", chat_id="chat-url", images=[png_url["url"]], wait_reply=False)
        assert sent["success"], sent
        _text, image = stack.messages("chat-url")
        assert image["msgtype"] == "image" and image["image_size"] == len(PNG)
        for odd in ("http://127.0.0.1:99999/x.png", "http://xn--a.invalid/x.png", "http://169.254.169.254/x.png"):
            failed = stack.send("坏图", chat_id="chat-odd", images=[odd], wait_reply=False)
            assert failed["success"] is False, failed
        assert stack.messages("chat-odd") == []
        health = httpx.get(f"{stack.server_url}/health").json()
        assert health["worker_connected"] is True
        assert stack.send("还活着", chat_id="chat-url", wait_reply=False)["success"]
    finally:
        stack.stop()


@pytest.mark.e2e
def test_e2e_direct_mode_refuses_loopback_images_by_default(tmp_path: Path) -> None:
    stack = Stack(mode="direct", tmp=tmp_path).start()
    try:
        png_url = httpx.post(f"{stack.fake_url}/_fake/images", files={"file": ("a.png", PNG, "image/png")}).json()
        refused = stack.send("看图", chat_id="chat-ssrf", images=[png_url["url"]], wait_reply=False)
        assert refused["success"] is False and "HIL_IMAGE_ALLOW_PRIVATE" in refused.get("error", refused["message"])
        for odd in ("http://127.0.0.1:99999/x.png", "http://xn--a.invalid/x.png"):
            assert stack.send("坏图", chat_id="chat-ssrf", images=[odd], wait_reply=False)["success"] is False
        assert stack.messages("chat-ssrf") == []
        assert stack.send("还活着", chat_id="chat-ssrf", wait_reply=False)["success"]
    finally:
        stack.stop()
