"""The dashboard: the last hour's and day's figures, the queue, and per tag which emails get
the most response, with a bar chart drawn on the server as inline SVG (no script)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from relay.console import web
from relay.console.web import Viewer
from relay.model import TagRow

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


@router.get("/dashboard", name="dashboard")
async def dashboard_page(request: Request, user: Viewer) -> Response:
    board = await web.store_of(request).dashboard()
    depth = sum(board.queue.values())
    return web.render(
        request, "dashboard.html",
        {"d": board, "depth": depth, "chart": chart(board.tags), "chart_tags": CHART_TAGS},
    )  # fmt: skip
