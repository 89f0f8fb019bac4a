"""A tile request's parts, checked: coordinates, format, layer filter, layergroup id."""

from __future__ import annotations

import re
from dataclasses import dataclass

from grantkey.domain.mapconfig import MAX_ZOOM, MapLayer
from grantkey.errors import BadInput

DIGITS = re.compile(r"[0-9]{1,10}")
LAYERGROUP_ID = re.compile(r"(0[0-9a-f]{39})(?::([0-9]{1,20}))?")
INVALID_FILTER = "Invalid layer filtering"


@dataclass(frozen=True)
class TileCoord:
    z: int
    x: int
    y: int


def _number(text: str) -> int | None:
    return int(text) if DIGITS.fullmatch(text) else None


def parse_tile(z: str, x: str, y_and_format: str) -> TileCoord:
    """`z`, `x` and `<y>.mvt` from the path: 400 for anything but a tile of the world."""
    y, dot, extension = y_and_format.rpartition(".")
    if not dot:
        raise BadInput("Missing tile format: grantkey serves vector tiles (.mvt)")
    if extension != "mvt":
        raise BadInput(f"Unsupported tile format '{extension[:20]}': grantkey serves vector "
                       "tiles (.mvt)")
    zoom, column, row = _number(z), _number(x), _number(y)
    if zoom is None or column is None or row is None or zoom > MAX_ZOOM:
        raise BadInput(f"Invalid tile coordinates: z, x and y are whole numbers, z at most "
                       f"{MAX_ZOOM}")
    if column >= 2 ** zoom or row >= 2 ** zoom:
        raise BadInput(f"Invalid tile coordinates: at zoom {zoom}, x and y are below "
                       f"{2 ** zoom}")
    return TileCoord(zoom, column, row)


def select_layers(layers: tuple[MapLayer, ...], selector: str | None) -> tuple[MapLayer, ...]:
    """`all`, `mapnik` (every layer: all are vector layers here), layer indexes or layer
    ids, comma-separated; anything else is 400 `Invalid layer filtering`."""
    if selector is None or selector in ("all", "mapnik"):
        return layers
    by_id = {layer.id: layer for layer in layers if layer.id is not None}
    chosen: list[MapLayer] = []
    for part in selector.split(","):
        index = _number(part)
        if index is not None and index < len(layers):
            layer = layers[index]
        elif part in by_id:
            layer = by_id[part]
        else:
            raise BadInput(INVALID_FILTER)
        if layer not in chosen:
            chosen.append(layer)
    return tuple(sorted(chosen, key=lambda layer: layer.index))


def parse_layergroup_id(text: str) -> tuple[str, int | None] | None:
    """`<hash>:<cache buster>` (the buster may be left out): the hash, and the buster."""
    found = LAYERGROUP_ID.fullmatch(text)
    if found is None:
        return None
    return found.group(1), None if found.group(2) is None else int(found.group(2))
