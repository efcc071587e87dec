"""Tables and HTML pages for the training studies (the scaling ladder, the growth study):
one formatting rule, so their markdown, HTML and terminal tables read alike."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd


def _fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "n/a"
        return f"{value:.3e}" if abs(value) >= 1e5 else f"{value:.4f}"
    return str(value)


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    return table.apply(lambda col: col.map(_fmt))


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate package)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_html_report(path: Path, title: str, intro: str, image: Path, image_alt: str,
                      sections: Sequence[tuple[str, pd.DataFrame]]) -> None:
    """One self-contained page: the plot inlined, then each (heading, table). `intro` and
    headings are HTML (headings may carry markup such as <sup>); `intro` is escaped."""
    encoded = base64.b64encode(image.read_bytes()).decode()
    body = "".join(f"<h2>{heading}</h2>{display_frame(frame).to_html(index=False)}" for heading, frame in sections)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"
        f"<img src='data:image/png;base64,{encoded}' alt='{html.escape(image_alt)}'>{body}</body></html>")
