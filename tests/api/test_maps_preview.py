"""A layergroup's preview page, in a real browser: Debian's chromium driven by Playwright
(launched with executable_path, Playwright cannot download browsers here), MapLibre GL JS
downloaded from the npm registry and served from 127.0.0.1 (GRANTKEY_MAPLIBRE_URL). The page
draws a regular key's map from its tiles; once the key is deleted it shows the error."""

from __future__ import annotations

import asyncio
import functools
import http.server
import io
import os
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_maps_api import SETUP, layer
from tests.conftest import Account, KeyHandle, Login
from tests.support import ServerProcess, free_port, table_grants

pytestmark = pytest.mark.slow  # its own server, a browser, npm

CHROMIUM = Path("/usr/bin/chromium")
MAPLIBRE_TARBALL = "https://registry.npmjs.org/maplibre-gl/-/maplibre-gl-4.7.1.tgz"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _required(reason: str) -> None:
    if os.environ.get("GRANTKEY_REQUIRE_POSTGIS") == "1":  # CI: the browser tests must run
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def maplibre(data_dir: Path) -> Iterator[str]:
    """MapLibre GL JS from the npm registry (its package's tarball: no npm needed), served
    on 127.0.0.1: its URL."""
    folder = data_dir / "maplibre"
    response = httpx.get(MAPLIBRE_TARBALL, timeout=120, follow_redirects=True)
    response.raise_for_status()
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        archive.extractall(folder, filter="data")
    dist = folder / "package" / "dist"
    handler = functools.partial(QuietHandler, directory=str(dist))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def preview_server(data_dir: Path, login: Login, maplibre: str) -> Iterator[ServerProcess]:
    server = ServerProcess(login.args(data_dir), data_dir / "preview.log",
                           {**login.env, "GRANTKEY_MAPLIBRE_URL": maplibre})
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


RENDERED = """() => {
  const map = window.grantkeyMap;
  if (!map || !map.loaded() || !map.areTilesLoaded()) return null;
  return map.queryRenderedFeatures().filter(f => f.layer.id !== "background")
            .map(f => ({layer: f.sourceLayer, type: f.geometry.type, name: f.properties.name}));
}"""


def test_the_preview_draws_a_regular_keys_map_and_shows_the_error_once_it_is_revoked(
        postgis: None, preview_server: ServerProcess, account: Account,
        owner_sql: Callable[[Account, str], None], make_key: Callable[..., KeyHandle],
        run: Callable[..., Any]) -> None:
    if not CHROMIUM.exists():
        _required("chromium is not installed (apt-get install chromium)")
    owner_sql(account, SETUP)
    key = make_key(account, "web-map", table_grants([("public", "places", ["select"])],
                                                    ("maps",)))
    maps = f"{preview_server.url}/user/{account.username}/api/v1/map"
    config = {"layers": [{"type": "mapnik", "id": "places<b>",
                          "options": {"sql": "SELECT * FROM places"}},
                         layer("SELECT 1 AS id, ST_MakeEnvelope(-5e6, -5e6, 5e6, 5e6, 3857) "
                               "AS the_geom_webmercator")]}
    made = httpx.post(maps, json=config, params={"api_key": key.token}, timeout=30)
    assert made.status_code == 200, made.text
    tile_url = made.json()["metadata"]["tilejson"]["vector"]["tiles"][0]
    tile_token = tile_url.split("api_key=")[1]
    page_url = f"{maps}/{made.json()['layergroupid']}/preview?api_key={tile_token}"
    key_url = f"{preview_server.url}/user/{account.username}/api/v3/api_keys/web-map"
    run(_in_the_browser(page_url, key.token, key_url, account.master()))


async def _in_the_browser(page_url: str, raw_key: str, key_url: str,
                          master: dict[str, str]) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader"])
        try:
            page = await browser.new_page(viewport={"width": 800, "height": 600})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            response = await page.goto(page_url)
            assert response is not None and response.status == 200
            assert raw_key not in await page.content()  # tiles come with a tile token
            assert "content-security-policy" in response.headers
            drawn = await _drawn_features(page, at_least=4, within=30.0)
            assert {d["name"] for d in drawn if d["layer"] == "places<b>"} == {
                "centre", "east", "north-west"}
            assert {(d["layer"], d["type"]) for d in drawn} >= {
                ("places<b>", "Point"), ("layer1", "Polygon")}
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "maps-preview.png"))
            assert await page.locator("#error").is_hidden()
            assert not [p for p in problems if "Content Security Policy" in p], problems

            async with httpx.AsyncClient(timeout=30) as client:
                assert (await client.delete(key_url, params=master)).status_code == 204
            await page.evaluate("window.grantkeyMap.setZoom(2)")  # new tiles: refused now
            await page.wait_for_selector("#error", state="visible", timeout=30_000)
            assert "refused" in await page.locator("#error").inner_text()
            await page.screenshot(path=str(ARTIFACTS / "maps-preview-revoked.png"))
            response = await page.goto(page_url)  # the page reloaded: the error, no map
            assert response is not None and response.status == 401
            assert ("This map cannot be shown (401): Unauthorized"
                    in await page.locator("#error").inner_text())
        finally:
            await browser.close()


async def _drawn_features(page: Any, at_least: int, within: float) -> list[dict[str, Any]]:
    """Poll the rendered features from outside the page: page.evaluate runs over the
    DevTools protocol, which the page's CSP does not cover, whereas wait_for_function
    re-evaluates its string inside the page and the CSP (no 'unsafe-eval') refuses that."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        drawn: list[dict[str, Any]] | None = await page.evaluate(f"({RENDERED})()")
        if drawn is not None and len(drawn) >= at_least:
            return drawn
        assert asyncio.get_running_loop().time() < deadline, f"only {drawn!r} drawn"
        await asyncio.sleep(0.2)
