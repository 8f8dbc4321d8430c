"""report.html: one self-contained page (inline CSS, SVG and script, no network) with the metrics
table, a chart, and the answers side by side with their word-level differences highlighted."""

from __future__ import annotations

import difflib
import re
from html import escape

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f4f4f4}td.num{text-align:right;
font-variant-numeric:tabular-nums}.better{color:#1a7f37}.worse{color:#cf222e}
pre{white-space:pre-wrap;margin:0;font:13px/1.4 ui-monospace,monospace}
.hl-del{background:#ffd7d5;text-decoration:line-through}.hl-ins{background:#ccffd8}
.scores{color:#555;font-size:12px}#controls{margin:1em 0}#script-errors{color:#cf222e}
"""

_SCRIPT = """
window.onerror = function (msg, src, line) {
  var box = document.getElementById('script-errors');
  box.textContent += 'script error: ' + msg + ' (line ' + line + ')\\n';
  document.body.setAttribute('data-script-errors', 'yes');
};
(function () {
  var rows = Array.prototype.slice.call(document.querySelectorAll('tr.example'));
  var query = document.getElementById('filter'), differ = document.getElementById('differ');
  function update() {
    var q = query.value.toLowerCase(), shown = 0;
    rows.forEach(function (row) {
      var ok = (!q || row.textContent.toLowerCase().indexOf(q) >= 0) &&
               (!differ.checked || row.getAttribute('data-differ') === 'yes');
      row.style.display = ok ? '' : 'none';
      if (ok) shown++;
    });
    document.getElementById('shown').textContent = shown + ' of ' + rows.length + ' shown';
  }
  query.addEventListener('input', update);
  differ.addEventListener('change', update);
  update();
  document.body.setAttribute('data-script-ok', 'yes');
})();
"""


def _tokens(text: str) -> list[str]:
    return re.findall(r"\s+|\w+|[^\w\s]", text)


def word_diff(old: str, new: str) -> tuple[str, str]:
    """Both texts as escaped HTML, words only in `old` marked hl-del and only in `new` hl-ins."""
    a, b = _tokens(old), _tokens(new)
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old_part, new_part = escape("".join(a[i1:i2])), escape("".join(b[j1:j2]))
        if op == "equal":
            left.append(old_part)
            right.append(new_part)
            continue
        if old_part:
            left.append(f'<span class="hl-del">{old_part}</span>')
        if new_part:
            right.append(f'<span class="hl-ins">{new_part}</span>')
    return "".join(left), "".join(right)


def _num(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _metrics_table(summary) -> str:
    labels = {role: m["label"] for role, m in summary.models.items()}
    head = "".join(f"<th>{escape(label)}</th>" for label in labels.values())
    if "compare" in labels:
        head += "<th>difference</th><th>95% CI</th>"
    body = []
    for name in [*summary.scores, "perplexity", "latency_s", "tokens_per_s", "errors"]:
        cells = []
        for role in labels:
            m = summary.models[role]
            value = m["metrics"].get(name, m.get(name))
            text = _num(value) if value is None or isinstance(value, float) else str(value)
            cells.append(f'<td class="num">{escape(text)}</td>')
        c = summary.comparison.get(name)
        if "compare" in labels:
            if c and c["diff"] is not None:
                sign = "better" if c["low"] > 0 else "worse" if c["high"] < 0 else ""
                interval = f'[{_num(c["low"], True)}, {_num(c["high"], True)}]'
                cells.append(f'<td class="num {sign}">{_num(c["diff"], True)}</td>'
                             f'<td class="num">{interval}</td>')
            else:
                cells.append("<td></td><td></td>")
        body.append(f"<tr><th>{escape(name)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"


def _chart(summary) -> str:
    """Grouped bars of every [0, 1] score, one colour per model, as inline SVG."""
    colours = {"model": "#2f81f7", "compare": "#bf8700"}
    roles = list(summary.models)
    group = 24 * len(roles) + 30
    width, height, top = 60 + group * len(summary.scores), 220, 20
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 60}" '
              f'role="img" aria-label="scores chart">'),
             f'<line x1="40" y1="{top + height}" x2="{width}" y2="{top + height}" stroke="#999"/>']
    for tick in (0, 0.5, 1):
        y = top + height * (1 - tick)
        parts.append(f'<text x="34" y="{y + 4}" font-size="11" text-anchor="end">{tick}</text>')
    for g, name in enumerate(summary.scores):
        x0 = 50 + g * group
        for r, role in enumerate(roles):
            value = summary.models[role]["metrics"].get(name) or 0.0
            h = height * max(0.0, min(1.0, value))
            parts.append(f'<rect x="{x0 + 24 * r}" y="{top + height - h:.1f}" width="20" '
                         f'height="{h:.1f}" fill="{colours[role]}"><title>'
                         f'{escape(summary.models[role]["label"])}: {name} {value:.3f}'
                         '</title></rect>')
        parts.append(f'<text x="{x0 + 12 * len(roles)}" y="{top + height + 16}" font-size="11" '
                     f'text-anchor="middle">{escape(name)}</text>')
    for r, role in enumerate(roles):
        y = top + height + 36 + 0 * r
        x = 50 + r * 260
        parts.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{colours[role]}"/>'
                     f'<text x="{x + 18}" y="{y}" font-size="12">'
                     f'{escape(summary.models[role]["label"][-36:])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _scores_line(row) -> str:
    if row is None:
        return ""
    text = ", ".join(f"{k} {v:.2f}" for k, v in row["scores"].items() if v is not None)
    if row.get("error"):
        text += f" — error: {row['error']}"
    return f'<div class="scores">{escape(text)}</div>'


def _examples_table(summary, rows: list[dict]) -> str:
    by_role = {role: {r["id"]: r for r in rows if r["role"] == role} for role in summary.models}
    labels = [m["label"] for m in summary.models.values()]
    order = [d["id"] for d in summary.largest_differences]
    ids = order + sorted(set(by_role["model"]) - set(order))
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    body = []
    for i in ids:
        a = by_role["model"].get(i)
        b = by_role.get("compare", {}).get(i)
        first = a or b
        # With two models, mark where the second differs from the first; else the reference.
        if "compare" in by_role:
            left, right = word_diff(b["answer"] if b else "", a["answer"] if a else "")
            cells = [f"<td><pre>{right}</pre>{_scores_line(a)}</td>",
                     f"<td><pre>{left}</pre>{_scores_line(b)}</td>"]
            differ = bool(a and b and a["answer"].strip() != b["answer"].strip())
        else:
            _, right = word_diff(first["reference"], a["answer"])
            cells = [f"<td><pre>{right}</pre>{_scores_line(a)}</td>"]
            differ = a["answer"].strip() != a["reference"].strip()
        body.append(f'<tr class="example" data-differ="{"yes" if differ else "no"}">'
                    f'<td class="num">{i}</td><td><pre>{escape(first["prompt"])}</pre></td>'
                    f'<td><pre>{escape(first["reference"])}</pre></td>{"".join(cells)}</tr>')
    return (f"<table><tr><th>#</th><th>prompt</th><th>reference</th>{head}</tr>"
            f"{''.join(body)}</table>")


def render_report(summary, rows: list[dict]) -> str:
    """The whole page as a string; every piece of data text is HTML-escaped."""
    models = " vs ".join(escape(m["label"]) for m in summary.models.values())
    note = ("Examples where the models differ most come first; highlighted words are where the "
            "answers differ (green: only in the first model's answer, red: only in the second's)."
            if "compare" in summary.models else
            "Highlighted words in each answer differ from the reference.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mlxtune eval: {models}</title>
<style>{_CSS}</style></head>
<body data-script-ok="no"><h1>mlxtune eval</h1>
<p>{models} on {summary.examples} examples of <code>{escape(summary.data)}</code>.</p>
<pre id="script-errors"></pre>
<h2>Metrics</h2>{_metrics_table(summary)}
<p>Differences are the first model minus the second, with a paired bootstrap 95% interval
(resampling examples, fixed seed); green where the interval is above zero, red where below.</p>
{_chart(summary)}
<h2>Answers</h2><p>{note}</p>
<div id="controls"><input id="filter" type="search" placeholder="filter examples">
<label><input id="differ" type="checkbox"> only where the answers differ</label>
<span id="shown"></span></div>
{_examples_table(summary, rows)}
<script>{_SCRIPT}</script>
</body></html>
"""
