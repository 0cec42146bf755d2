"""The HTML page: template, escaping, tables and figure embedding.

Safety rules, in one place:
- every string from the data goes through :func:`esc` before it reaches HTML;
- figures are embedded with plotly's ``to_html``, whose JSON escapes ``<``, ``>`` and ``/``
  (so ``</script>`` in a layer name cannot end the script element); :func:`figure_html`
  re-checks that and refuses to embed anything that could;
- div ids are derived from section keys and a counter, never from data, so the output is
  deterministic and ids are safe.
"""
from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
_ID_SAFE = re.compile(r"[^a-z0-9-]+")


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included, so it is safe in attributes too)."""
    return html.escape(str(value), quote=True)


@dataclass(kw_only=True)
class Block:
    """Part of a section: trusted HTML built by this module's helpers, or a figure."""

    html: str = ""
    figure: go.Figure | None = None


@dataclass(kw_only=True)
class Section:
    """A titled part of the page; without blocks it shows ``note`` instead of content."""

    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    note: str = ""
    intro: str = ""

    def add_html(self, text: str) -> None:
        self.blocks.append(Block(html=text))

    def add_figure(self, fig: go.Figure | None) -> None:
        if fig is not None:
            self.blocks.append(Block(figure=fig))

    @property
    def figures(self) -> list[go.Figure]:
        return [b.figure for b in self.blocks if b.figure is not None]


# --- formatting ---------------------------------------------------------------------------


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def fmt_ms(us: Any) -> str:
    """Microseconds shown as milliseconds with a precision that suits the size."""
    if _missing(us):
        return "—"
    ms = float(us) / 1000.0
    if abs(ms) >= 100:
        return f"{ms:,.1f}"
    if abs(ms) >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_pct(v: Any) -> str:
    return "—" if _missing(v) else f"{float(v):+.1f}%"


def fmt_abs_pct(v: Any) -> str:
    """An |error| in percent, without sign (a "+" would read as a signed error)."""
    return "—" if _missing(v) else f"{abs(float(v)):.1f}%"


def fmt_share(v: Any) -> str:
    """A percentage that is a share (0..100), without sign."""
    return "—" if _missing(v) else f"{float(v):.0f}%"


def fmt_ratio(v: Any) -> str:
    return "—" if _missing(v) else f"{float(v):.2f}×"


def fmt_plain(v: Any) -> str:
    if _missing(v) or v == "":
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_plain(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_plain(x)}" for k, x in v.items())
    return str(v)


Column = tuple[str, str, Callable[[Any], str]]


def table(df: pd.DataFrame, columns: Sequence[Column], *, caption: str = "",
          numeric: Sequence[str] = (), wrap: Sequence[str] = ()) -> str:
    """An HTML table of ``df``: columns are (column, header, formatter); every cell escaped.
    Cells stay on one line, except those of the ``wrap`` columns (long lists of paths)."""
    head = "".join(f"<th>{esc(header)}</th>" for _, header, _ in columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for col, _, fmt in columns:
            cls = ' class="num"' if col in numeric else ' class="wrap"' if col in wrap else ""
            cells.append(f"<td{cls}>{esc(fmt(row.get(col)))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def heading(text: str) -> str:
    return f"<h3>{esc(text)}</h3>"


# --- figures --------------------------------------------------------------------------------


def figure_html(fig: go.Figure, div_id: str, *, include_plotlyjs: bool) -> str:
    """The figure as a ``<div>`` + ``<script>``; plotly.js itself only when asked."""
    height = fig.layout.height
    options = {
        "full_html": False,
        "div_id": div_id,
        "config": PLOTLY_CONFIG,
        "default_height": f"{height}px" if height else "100%",
    }
    bare = str(fig.to_html(include_plotlyjs=False, **options))
    check_scripts(bare, div_id)
    return str(fig.to_html(include_plotlyjs=True, **options)) if include_plotlyjs else bare


def check_scripts(fragment: str, where: str) -> None:
    """Raise if text inside a script element could open or close a script element.

    Each figure fragment has exactly as many ``<script`` as ``</script``; data that smuggled
    either in (unescaped JSON) breaks the balance.
    """
    low = fragment.lower()
    opened, closed = low.count("<script"), low.count("</script")
    if opened != closed:
        raise ValueError(f"figure {where}: data would open or close a <script> element")


# --- page -----------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2733;\
background:#f6f7f9}
header{background:#1d2733;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px}
header p{margin:6px 0 0;color:#c6ced8;font-size:13px}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid #dde2e8;font-size:13px}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
main{padding:8px 32px 40px}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;margin:16px 0;\
padding:8px 20px 16px}
section h2{font-size:18px;margin:10px 0}
section h3{font-size:15px;margin:16px 0 6px}
p{font-size:14px;line-height:1.4}
p.note{color:#6b7785;font-style:italic}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:8px 0 12px}
caption{text-align:left;color:#6b7785;padding-bottom:4px}
th,td{border-bottom:1px solid #e6e9ee;padding:4px 10px;text-align:left;white-space:nowrap}
th{background:#f0f2f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.wrap{white-space:normal;min-width:24em;max-width:48em;overflow-wrap:anywhere}
.figure{margin:6px 0 14px}
footer{color:#6b7785;font-size:12px;padding:0 32px 24px}
"""


def render_page(*, title: str, subtitle: str, sections: Sequence[Section], footer: str) -> str:
    """The whole HTML document; plotly.js is embedded once, with the first figure."""
    counter = 0
    body: list[str] = []
    nav: list[str] = []
    for section in sections:
        key = _ID_SAFE.sub("-", section.key.lower()).strip("-") or "section"
        nav.append(f'<a href="#{key}">{esc(section.title)}</a>')
        parts = [f'<section id="{key}"><h2>{esc(section.title)}</h2>']
        if section.intro:
            parts.append(f"<p>{esc(section.intro)}</p>")
        if not section.blocks:
            parts.append(f'<p class="note">{esc(section.note or "No data for this section.")}</p>')
        for block in section.blocks:
            if block.figure is not None:
                counter += 1
                div_id = f"fig-{counter:02d}-{key}"
                parts.append('<div class="figure">'
                             + figure_html(block.figure, div_id, include_plotlyjs=(counter == 1))
                             + "</div>")
            else:
                parts.append(block.html)
        parts.append("</section>")
        body.append("\n".join(parts))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>\n"
        f"<nav>{''.join(nav)}</nav>\n<main>\n" + "\n".join(body) + "\n</main>\n"
        f"<footer>{esc(footer)}</footer>\n</body>\n</html>\n"
    )
