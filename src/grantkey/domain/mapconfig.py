"""A Maps API layergroup config (CARTO's MapConfig, `carto-compat.md` §8), checked and
normalised: what grantkey keeps of it is exactly what draws its tiles (no credential the
client put beside it), and the same map always normalises to the same text."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from grantkey.domain.sql_text import COPY_REFUSED, starts_a_copy
from grantkey.errors import BadInput

MAX_VERSION = (1, 8, 0)
DEFAULT_VERSION = "1.0.0"
VECTOR_TYPES = ("cartodb", "mapnik")  # both drawn as vector tiles here
DEFAULT_GEOM_COLUMN = "the_geom_webmercator"
DEFAULT_EXTENT = 4096
DEFAULT_BUFFER_PX = 64  # CARTO's vector buffer, in pixels of a 256-pixel tile
MAX_ZOOM = 30
MAX_LAYERS = 32
MAX_LAYER_ID = 100
VERSION = re.compile(r"(\d{1,4})\.(\d{1,4})\.(\d{1,4})")


@dataclass(frozen=True)
class MapLayer:
    """One layer: its SQL (the client's, never edited) and how its tiles are cut."""

    index: int
    id: str | None
    sql: str
    geom_column: str
    minzoom: int
    maxzoom: int
    extent: int
    buffer: int  # in tile units: the buffer in pixels times extent / 256
    simplify_extent: int | None

    @property
    def name(self) -> str:
        """The MVT layer's name: the layer's id, else `layer<N>`."""
        return self.id if self.id is not None else f"layer{self.index}"

    def draws_at(self, zoom: int) -> bool:
        return self.minzoom <= zoom <= self.maxzoom


@dataclass(frozen=True)
class MapConfig:
    version: str
    layers: tuple[MapLayer, ...]

    def canonical(self) -> bytes:
        """The normalised config as JSON (sorted keys): what is stored and hashed."""
        return orjson.dumps({"version": self.version,
                             "layers": [asdict(layer) for layer in self.layers]},
                            option=orjson.OPT_SORT_KEYS)

    def layergroup_hash(self, database: str, role: str, template: str | None = None) -> str:
        """The same map made by the same role is the same layergroup; another role's (or a
        named map's) is another. Starts with a digit: `<hash>:<n>` must not read as a URL
        scheme."""
        digest = hashlib.sha256(database.encode() + b"\0" + role.encode() + b"\0"
                                + (template or "").encode() + b"\0"
                                + self.canonical()).hexdigest()
        return "0" + digest[:39]


def from_canonical(data: dict[str, Any]) -> MapConfig:
    """A stored config back (written by `canonical`)."""
    return MapConfig(str(data["version"]),
                     tuple(MapLayer(**layer) for layer in data["layers"]))


def _version(raw: object) -> str:
    if raw is None:
        return DEFAULT_VERSION
    text = str(raw)
    found = VERSION.fullmatch(text)
    if found is None or tuple(int(part) for part in found.groups()) > MAX_VERSION:
        raise BadInput(f"Unsupported layergroup configuration version {text[:40]}")
    return text


def _integer(options: dict[str, Any], name: str, default: int, low: int, high: int,
             index: int) -> int:
    value = options.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadInput(f"Invalid {name} for layer {index}: an integer from {low} to {high}")
    return value


def _text(options: dict[str, Any], name: str, index: int) -> str | None:
    value = options.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\x00" in value:
        raise BadInput(f"Invalid {name} for layer {index}: a non-empty string")
    return value


def _analyses(config: dict[str, Any]) -> dict[str, str]:
    """carto.js 4's form: `source` analyses hold the SQL that layers name by id."""
    analyses = config.get("analyses") or []
    if not isinstance(analyses, list):
        raise BadInput("Invalid analyses in layergroup config: an array")
    queries = {}
    for node in analyses:
        if not isinstance(node, dict):
            raise BadInput("Invalid analyses in layergroup config: an array of objects")
        params = node.get("params")
        if node.get("type") != "source" or not isinstance(params, dict):
            raise BadInput("Unsupported analysis: grantkey takes only analyses of type "
                           "'source' with params.query")
        if isinstance(node.get("id"), str) and isinstance(params.get("query"), str):
            queries[node["id"]] = params["query"]
    return queries


def _layer_sql(options: dict[str, Any], index: int, sources: dict[str, str],
               max_bytes: int) -> str:
    source = options.get("source")
    if options.get("sql") is None and isinstance(source, dict):
        query = sources.get(str(source.get("id")))
        if query is None:
            raise BadInput(f"Missing analysis node '{str(source.get('id'))[:100]}' for "
                           f"layer {index}")
    else:
        query = options.get("sql")
    if not isinstance(query, str) or not query.strip():
        raise BadInput(f"Missing sql for layer {index} options")
    if "\x00" in query:
        raise BadInput(f"The sql of layer {index} contains a NUL character")
    if len(query.encode("utf-8", "surrogatepass")) > max_bytes:
        raise BadInput(f"The sql of layer {index} is too long: the limit is {max_bytes} bytes")
    if starts_a_copy(query):
        raise BadInput(COPY_REFUSED)
    return query.strip().rstrip(";")


def _layer(raw: object, index: int, buffer_px: int, sources: dict[str, str],
           max_bytes: int) -> MapLayer:
    if not isinstance(raw, dict) or not isinstance(raw.get("options"), dict):
        raise BadInput(f"Missing options from layer {index} of layergroup config")
    kind = raw.get("type", "cartodb")
    if kind not in VECTOR_TYPES:
        raise BadInput(f"Unsupported layer type '{str(kind)[:40]}' in layer {index}: grantkey "
                       "draws 'mapnik' and 'cartodb' layers, as vector tiles")
    options: dict[str, Any] = raw["options"]
    if options.get("cartocss") is not None:
        raise BadInput(f"Layer {index} asks for raster tiles (cartocss): grantkey serves "
                       "vector tiles only (.mvt); remove cartocss from the layer's options")
    layer_id = raw.get("id")
    if layer_id is not None and (not isinstance(layer_id, str) or not layer_id
                                 or len(layer_id) > MAX_LAYER_ID or "," in layer_id
                                 or not layer_id.isprintable() or layer_id.isdigit()
                                 or layer_id in ("all", "mapnik")):
        # a layer filter names layers by index or id: an id must not read as either
        raise BadInput(f"Invalid id for layer {index}: up to {MAX_LAYER_ID} printable "
                       "characters, no comma, not only digits, not 'all' or 'mapnik'")
    extent = _integer(options, "vector_extent", DEFAULT_EXTENT, 256, 65536, index)
    minzoom = _integer(options, "minzoom", 0, 0, MAX_ZOOM, index)
    maxzoom = _integer(options, "maxzoom", MAX_ZOOM, 0, MAX_ZOOM, index)
    if minzoom > maxzoom:
        raise BadInput(f"Invalid zoom range for layer {index}: minzoom is above maxzoom")
    simplify = options.get("vector_simplify_extent")
    return MapLayer(
        index=index, id=layer_id, sql=_layer_sql(options, index, sources, max_bytes),
        geom_column=_text(options, "geom_column", index) or DEFAULT_GEOM_COLUMN,
        minzoom=minzoom, maxzoom=maxzoom, extent=extent,
        buffer=round(buffer_px * extent / 256),
        simplify_extent=None if simplify is None else _integer(
            options, "vector_simplify_extent", extent, 1, extent, index))


def _buffer_px(config: dict[str, Any]) -> int:
    sizes = config.get("buffersize")
    if sizes is None:
        return DEFAULT_BUFFER_PX
    value = sizes.get("mvt", DEFAULT_BUFFER_PX) if isinstance(sizes, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise BadInput("Invalid buffersize.mvt: an integer from 0 to 256 (pixels)")
    return value


def parse_mapconfig(raw: object, *, max_sql_bytes: int) -> MapConfig:
    """Check a client's MapConfig (CARTO's messages); keys it does not know are ignored
    (the SDK adds `api_key` and `client`) and not kept."""
    if not isinstance(raw, dict):
        raise BadInput("The layergroup config must be a JSON object")
    version = _version(raw.get("version"))
    layers = raw.get("layers")
    if not isinstance(layers, list) or not layers:
        raise BadInput("Missing layers array from layergroup config")
    if len(layers) > MAX_LAYERS:
        raise BadInput(f"Too many layers in layergroup config: the limit is {MAX_LAYERS}")
    buffer_px = _buffer_px(raw)
    sources = _analyses(raw)
    parsed = tuple(_layer(layer, index, buffer_px, sources, max_sql_bytes)
                   for index, layer in enumerate(layers))
    names = [layer.name for layer in parsed]  # an MVT tile's layers have distinct names
    if len(names) != len(set(names)):
        raise BadInput("Layer ids must be unique in a layergroup config (a layer without an "
                       "id is named layer<N>)")
    total = sum(len(layer.sql.encode("utf-8", "surrogatepass")) for layer in parsed)
    if total > max_sql_bytes:
        raise BadInput(f"The layers' sql is too long: the limit is {max_sql_bytes} bytes for "
                       "all layers together")
    return MapConfig(version, parsed)
