"""A layergroup's preview: an HTML page with a MapLibre GL JS map of its tiles.

`GET /api/v1/map/<layergroupid>/preview`, with the credential of a tile (a key, or the
layergroup's tile token). The page's tile URLs carry a tile token, never a key. Each map
layer is drawn by geometry type (circles, lines, fills); a click lists the clicked feature's
properties (as text: they are tenant data); tiles the server refuses (a revoked key) show
the error instead. MapLibre comes from GRANTKEY_MAPLIBRE_URL (a folder holding
maplibre-gl.js and maplibre-gl.css). A strict Content-Security-Policy allows only that
origin, this server and the page's own nonce-tagged script.
"""

from __future__ import annotations

import html
import secrets
from urllib.parse import urlsplit

import orjson
from starlette.responses import HTMLResponse

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>grantkey map preview</title>
<link rel="stylesheet" href="{maplibre}/maplibre-gl.css">
<style nonce="{nonce}">
html, body, #map {{ margin: 0; height: 100%; font: 14px system-ui, sans-serif; }}
#error {{ position: absolute; top: 12px; left: 12px; right: 12px; padding: 12px;
  background: #fde8e8; color: #8a1c1c; border: 1px solid #e3a0a0; border-radius: 6px; }}
#feature {{ position: absolute; bottom: 12px; left: 12px; max-width: 40%; max-height: 40%;
  overflow: auto; padding: 8px; background: #fff; border-radius: 6px;
  box-shadow: 0 1px 4px rgba(0,0,0,.3); }}
#feature table {{ border-collapse: collapse; }} #feature td {{ padding: 2px 6px; }}
</style>
</head><body>
<div id="map"></div>
<div id="error" role="alert"{error_hidden}>{error}</div>
<div id="feature" hidden></div>
<script id="preview-config" type="application/json">{config}</script>
<script nonce="{nonce}" src="{maplibre}/maplibre-gl.js"></script>
<script nonce="{nonce}">
(function () {{
  "use strict";
  var config = JSON.parse(document.getElementById("preview-config").textContent);
  if (!config.tiles) {{ return; }}
  var errorBox = document.getElementById("error");
  function showError(text) {{ errorBox.textContent = text; errorBox.hidden = false; }}
  if (typeof maplibregl === "undefined") {{
    showError("MapLibre GL JS could not be loaded from " + config.maplibre); return;
  }}
  var colours = ["#d7263d", "#1b998b", "#2e86ab", "#f49d37", "#7b2cbf", "#3f88c5"];
  var layers = [];
  config.layers.forEach(function (name, i) {{
    var colour = colours[i % colours.length];
    var base = {{ source: "layergroup", "source-layer": name }};
    layers.push(Object.assign({{ id: i + "-fill", type: "fill",
      filter: ["==", ["geometry-type"], "Polygon"],
      paint: {{ "fill-color": colour, "fill-opacity": 0.4, "fill-outline-color": colour }} }}, base));
    layers.push(Object.assign({{ id: i + "-line", type: "line",
      filter: ["==", ["geometry-type"], "LineString"],
      paint: {{ "line-color": colour, "line-width": 2 }} }}, base));
    layers.push(Object.assign({{ id: i + "-circle", type: "circle",
      filter: ["==", ["geometry-type"], "Point"],
      paint: {{ "circle-color": colour, "circle-radius": 5, "circle-stroke-color": "#fff",
               "circle-stroke-width": 1 }} }}, base));
  }});
  var map = new maplibregl.Map({{
    container: "map", hash: true, center: [0, 20], zoom: 1,
    style: {{ version: 8, sources: {{ layergroup: {{ type: "vector", tiles: [config.tiles],
      minzoom: 0, maxzoom: 22 }} }}, layers: [{{ id: "background", type: "background",
      paint: {{ "background-color": "#f4f1ea" }} }}].concat(layers) }}
  }});
  window.grantkeyMap = map;
  map.on("error", function (event) {{
    var status = event.error && event.error.status;
    if (status === 401 || status === 403 || status === 404) {{
      showError("The server refused this map's tiles (" + status + "): the key that made " +
                "it was revoked, or may not read its tables any more.");
    }} else if (event.error) {{
      showError("Tiles failed: " + (event.error.message || "unknown error"));
    }}
  }});
  var panel = document.getElementById("feature");
  map.on("click", function (event) {{
    var found = map.queryRenderedFeatures(event.point).filter(function (f) {{
      return f.layer.id !== "background"; }});
    panel.replaceChildren();
    if (!found.length) {{ panel.hidden = true; return; }}
    var feature = found[0], title = document.createElement("strong");
    title.textContent = feature.sourceLayer;
    var table = document.createElement("table");
    Object.keys(feature.properties).forEach(function (key) {{
      var row = table.insertRow();
      row.insertCell().textContent = key;
      row.insertCell().textContent = String(feature.properties[key]);
    }});
    panel.append(title, table);
    panel.hidden = false;
  }});
}}());
</script>
</body></html>
"""


def _script_json(value: object) -> str:
    """JSON to embed in a <script> element: `<`, `>` and `&` escaped, so tenant text (a
    layer id) cannot close the element."""
    text = orjson.dumps(value).decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp(maplibre: str, nonce: str) -> str:
    parts = urlsplit(maplibre)
    origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "'self'"
    return (f"default-src 'none'; script-src 'nonce-{nonce}' {origin}; "
            f"style-src 'nonce-{nonce}' {origin}; img-src data: blob:; connect-src 'self'; "
            "worker-src blob:; child-src blob:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def page(maplibre: str, *, tiles: str | None, layers: list[str], error: str | None,
         status: int = 200) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    body = PAGE.format(
        maplibre=html.escape(maplibre.rstrip("/"), quote=True), nonce=nonce,
        config=_script_json({"tiles": tiles, "layers": layers, "maplibre": maplibre}),
        error="" if error is None else html.escape(error),
        error_hidden="" if error is not None else " hidden")
    return HTMLResponse(body, status_code=status, headers={
        "Content-Security-Policy": _csp(maplibre, nonce), "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"})
