"""The document model: the report built once as blocks, rendered to Markdown and to HTML.

Content code makes a list of blocks (:class:`Heading`, :class:`Para`, :class:`Table`,
:class:`Plot`, :class:`Code`, :class:`Group`); :func:`render_markdown` and :func:`render_html`
turn the same list into the two documents, so they cannot disagree. The HTML is self-contained
(inline CSS, plots as base64 PNG data URIs, nothing fetched), so the one file can be mailed,
archived or published as it is. Nothing here knows what a report is about.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    css: str = ""  # "headline" or "note" in HTML; a blockquote in Markdown


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)  # right-align these columns
    caption: str = ""


@dataclass
class Plot:
    name: str  # file name beside report.md
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Code:
    text: str
    caption: str = ""


@dataclass
class Group:
    """Blocks shown side by side in HTML (a figure and its table), one after another in Markdown."""

    blocks: list
    css: str = "group"  # "group": a flex row; "grid3": three equal columns (a matrix row of plots)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: Sequence) -> str:
    """The report as Markdown; images are referenced by file name (the PNGs sit beside it)."""
    out = [f"# {title}", ""]

    def emit(block) -> None:
        if isinstance(block, Heading):
            out.extend([f"{'#' * (block.level + 1)} {block.text}", ""])
        elif isinstance(block, Para):
            out.extend([("> " if block.css else "") + block.text, ""])
        elif isinstance(block, Table):
            if block.caption:
                out.extend([f"*{block.caption}*", ""])
            align = [("---:" if num else "---") for num in (block.numeric or [False] * len(block.header))]
            out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            out.append("| " + " | ".join(align) + " |")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows)
            out.append("")
        elif isinstance(block, Plot):
            out.extend([f"![{block.alt}]({block.name})", ""])
            if block.caption:
                out.extend([f"*{block.caption}*", ""])
        elif isinstance(block, Code):
            if block.caption:
                out.extend([f"*{block.caption}*", ""])
            out.extend(["```yaml", block.text.rstrip("\n"), "```", ""])
        elif isinstance(block, Group):
            for b in block.blocks:
                emit(b)

    for block in blocks:
        emit(block)
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# Self-contained HTML
# --------------------------------------------------------------------------------------------


_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#dde2ea; --accent:#1f5fa8; --bg-soft:#f5f7fa; }
* { box-sizing:border-box; }
body { margin:0; color:var(--fg); background:#fff;
  font:15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width:1240px; margin:0 auto; padding:32px 28px 64px; }
h1 { font-size:28px; margin:0 0 4px; }
h2 { font-size:21px; margin:40px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:16px; margin:26px 0 8px; }
p { margin:8px 0 12px; }
.meta { color:var(--muted); font-size:13px; margin-bottom:20px; }
.headline { background:#eef4fb; border-left:4px solid var(--accent); padding:12px 16px; font-size:16.5px; }
.note { background:#fff8e6; border-left:4px solid #e0a800; padding:8px 14px; font-size:14px; }
table { border-collapse:collapse; margin:6px 0 18px; font-size:13.5px; }
caption { caption-side:top; text-align:left; color:var(--muted); font-size:13px; padding-bottom:4px; }
th, td { border-bottom:1px solid var(--line); padding:5px 12px; text-align:left; vertical-align:top; }
th { background:var(--bg-soft); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
figure { margin:8px 0 18px; }
figure img { max-width:100%; height:auto; display:block; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.group { display:flex; flex-wrap:wrap; gap:20px; align-items:flex-start; }
.group > * { flex:0 1 auto; }
.grid3 { display:grid; grid-template-columns:repeat(3, minmax(0, 1fr)); gap:14px; }
.grid3 figure { margin:4px 0; }
.empty { color:var(--muted); background:var(--bg-soft); border:1px dashed var(--line); padding:24px 16px; text-align:center; }
pre { background:var(--bg-soft); border:1px solid var(--line); padding:12px 14px; overflow:auto;
  font:12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; max-height:520px; }
"""


def render_html(title: str, meta: str, blocks: Sequence) -> str:
    """The report as one self-contained HTML page: inline CSS, plots as base64 data URIs."""
    esc = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
        f'<div class="meta">{esc(meta)}</div>',
    ]

    def emit(block) -> None:
        if isinstance(block, Heading):
            out.append(f"<h{block.level + 1}>{esc(block.text)}</h{block.level + 1}>")
        elif isinstance(block, Para):
            css = f' class="{block.css}"' if block.css else ""
            out.append(f"<p{css}>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            numeric = block.numeric or [False] * len(block.header)
            cls = [' class="num"' if n else "" for n in numeric]
            out.append("<table>")
            if block.caption:
                out.append(f"<caption>{esc(block.caption)}</caption>")
            head = "".join(f"<th{c}>{esc(h)}</th>" for c, h in zip(cls, block.header))
            out.append(f"<thead><tr>{head}</tr></thead><tbody>")
            for row in block.rows:
                out.append("<tr>" + "".join(f"<td{c}>{esc(v)}</td>" for c, v in zip(cls, row)) + "</tr>")
            out.append("</tbody></table>")
        elif isinstance(block, Plot):
            data = base64.b64encode(block.png).decode("ascii")
            caption = f"<figcaption>{esc(block.caption)}</figcaption>" if block.caption else ""
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.alt)}">{caption}</figure>')
        elif isinstance(block, Code):
            if block.caption:
                out.append(f'<p class="meta">{esc(block.caption)}</p>')
            out.append(f"<pre>{esc(block.text)}</pre>")
        elif isinstance(block, Group):
            out.append(f'<div class="{block.css}">')
            for b in block.blocks:
                emit(b)
            out.append("</div>")

    for block in blocks:
        emit(block)
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"
