"""The dashboard: the last hour's and day's figures, the queue, the nodes (a panel each), and
per tag which emails get the most response, with a bar chart drawn on the server as inline SVG
(no script)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from relay.console import web
from relay.console.web import Viewer
from relay.model import Node, TagRow

router = APIRouter(prefix=web.PREFIX, include_in_schema=False)

CHART_TAGS = 12  # tags in the chart (the most received); the table has them all
LABEL_W, BAR_W, ROW_H, BAR_H, TOP = 180, 520, 58, 14, 30  # the chart's geometry, in px


@dataclass(frozen=True, slots=True)
class Bar:
    kind: str  # delivered | open | click (the CSS class)
    y: int
    width: float
    label: str  # the rate as text


@dataclass(frozen=True, slots=True)
class ChartRow:
    tag: str
    y: int
    bars: tuple[Bar, ...]


@dataclass(frozen=True, slots=True)
class Chart:
    rows: tuple[ChartRow, ...]
    width: int
    height: int
    bar_x: int
    bar_w: int


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def chart(tags: tuple[TagRow, ...]) -> Chart:
    """Delivery, human open and human click rates of the most received tags, one group of bars each."""
    rows = []
    for i, t in enumerate(tags[:CHART_TAGS]):
        y = TOP + i * ROW_H
        rates = (("delivered", t.delivery_rate), ("open", t.open_rate), ("click", t.click_rate))
        bars = tuple(
            Bar(kind, y + j * (BAR_H + 2), round(BAR_W * min(max(rate or 0.0, 0.0), 1.0), 1), _rate(rate))
            for j, (kind, rate) in enumerate(rates)
        )
        rows.append(ChartRow("(no tag)" if t.tag is None else t.tag[:28], y, bars))
    height = TOP + len(rows) * ROW_H + 10
    return Chart(tuple(rows), LABEL_W + BAR_W + 70, height, LABEL_W, BAR_W)


@dataclass(frozen=True, slots=True)
class NodePanel:
    """One node's card: the registry's row as of the page's time."""

    node: Node
    state: str  # alive | dead | stopped
    heartbeat_age: float  # seconds


def node_panels(nodes: list[Node], now: float) -> list[NodePanel]:
    """Running nodes first (alive, then dead: those want a look), stopped ones last."""
    order = {"alive": 0, "dead": 1, "stopped": 2}
    panels = [NodePanel(n, str(n.to_json(now)["state"]), max(0.0, now - n.heartbeat_at)) for n in nodes]
    return sorted(panels, key=lambda p: (order[p.state], p.node.started_at))


@router.get("/dashboard", name="dashboard")
async def dashboard_page(request: Request, user: Viewer) -> Response:
    store = web.store_of(request)
    board = await store.dashboard()
    nodes = node_panels(await store.nodes(), time.time())
    depth = sum(board.queue.values())
    return web.render(
        request, "dashboard.html",
        {"d": board, "depth": depth, "chart": chart(board.tags), "chart_tags": CHART_TAGS, "nodes": nodes},
    )  # fmt: skip
