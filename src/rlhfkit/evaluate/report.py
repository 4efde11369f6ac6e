"""A self-contained HTML report: headings, paragraphs, tables, embedded PNG plots and model samples.

Everything given to a Report is untrusted text (model answers above all): it is escaped with
`html.escape(..., quote=True)` on the way in, and no method takes markup. The page has no scripts, no
external URLs (plots are `data:image/png;base64,...`), inline CSS only, and a Content-Security-Policy
that forbids anything else, so a hostile answer can at worst read oddly, never run or phone home.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
from pathlib import Path

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.6em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; height: auto; }
table.samples { table-layout: fixed; width: 100%; }
table.samples td { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace;
                   font-size: 0.85em; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f7f7f7; padding: 0.6em; }
nav ul { columns: 2; font-size: 0.9em; }
.note { color: #777; font-style: italic; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def format_value(value: object) -> str:
    """A table cell as text: None -> "-", ints with thousands separators, floats with 4 significant
    digits (scientific notation for very large or small), nan/inf spelled out; anything else str()."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == 0:
            return "0"
        if v.is_integer() and abs(v) < 1e9:
            return f"{int(v):,}"
        if abs(v) >= 1e6 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(value)


class Report:
    """Build the page part by part, then `html()` or `write(path)`. Parts appear in the order added."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []
        self._toc: list[tuple[str, str]] = []  # (anchor, escaped heading) of the level-2 headings

    def heading(self, text: str, level: int = 2) -> None:
        if not 1 <= level <= 6:
            raise ValueError(f"Report.heading: level must be 1..6, got {level}")
        anchor = f"s{len(self._parts)}"  # generated, never from the text
        if level == 2:
            self._toc.append((anchor, _esc(text)))
        self._parts.append(f'<h{level} id="{anchor}">{_esc(text)}</h{level}>')

    def paragraph(self, text: str) -> None:
        self._parts.append(f"<p>{_esc(text)}</p>")

    def note(self, text: str) -> None:
        """A muted paragraph (caveats, how a number was computed)."""
        self._parts.append(f'<p class="note">{_esc(text)}</p>')

    def preformatted(self, text: str) -> None:
        """Text kept as written (a command line, a config), wrapped at the page width."""
        self._parts.append(f"<pre>{_esc(text)}</pre>")

    def table(self, columns: list[str], rows: list[list[object]], caption: str = "") -> None:
        """A table; numbers are right-aligned and formatted by `format_value`."""
        for i, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(f"Report.table: rows[{i}] has {len(row)} cells, expected {len(columns)} "
                                 f"(one per column)")
        head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
        body = []
        for row in rows:
            cells = []
            for v in row:
                numeric = isinstance(v, numbers.Real) and not isinstance(v, bool)
                cells.append(f'<td class="num">{_esc(format_value(v))}</td>' if numeric
                             else f"<td>{_esc(format_value(v))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
        self._parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")

    def image(self, png: bytes, caption: str) -> None:
        """A PNG (the bytes of a `plots` function), embedded in the page as a data: URI."""
        if not isinstance(png, (bytes, bytearray)) or not bytes(png).startswith(PNG_SIGNATURE):
            raise ValueError("Report.image: png must be the bytes of a PNG file (they start with \\x89PNG)")
        data = base64.b64encode(bytes(png)).decode("ascii")
        self._parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
                           f"<figcaption>{_esc(caption)}</figcaption></figure>")

    def samples(self, rows: list[dict[str, str]], columns: list[str], max_chars: int = 4000) -> None:
        """Model outputs side by side: one table row per prompt, one column per key in `columns` (e.g.
        prompt, base, tuned), text kept as written (pre-wrap). A missing key is an empty cell; text past
        max_chars is cut, saying how much was left out."""
        if not columns:
            raise ValueError("Report.samples: columns is empty")
        head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
        body = []
        for row in rows:
            cells = []
            for c in columns:
                text = str(row.get(c, ""))
                if len(text) > max_chars:
                    text = text[:max_chars] + f"\n[... {len(text) - max_chars:,} more characters]"
                cells.append(f"<td>{_esc(text)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        self._parts.append(f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
                           "</table>")

    def html(self) -> str:
        toc = ""
        if len(self._toc) > 1:
            items = "".join(f'<li><a href="#{a}">{t}</a></li>' for a, t in self._toc)
            toc = f"<nav><ul>{items}</ul></nav>"
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
                '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                '<meta name="referrer" content="no-referrer">\n'
                f"<title>{_esc(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
                f"<h1>{_esc(self.title)}</h1>\n{toc}\n" + "\n".join(self._parts) + "\n</body>\n</html>\n")

    def write(self, path: str | Path) -> Path:
        """Write the page to path in one rename (a kill leaves the old file or the new one); returns path."""
        from rlhfkit.runtime.atomic import write_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self.html())
        return path
