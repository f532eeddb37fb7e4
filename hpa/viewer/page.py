"""The viewer page: ``index.html`` beside the field pictures, to browse every cell's answer.

One static file (no server, no network, no external asset): the fields' answers are embedded
as JSON and a little JavaScript draws one card per field (its picture from
:func:`hpa.viewer.render.render_field`, linked full size, and a table of its cells' top three
classes with their confidences), 50 cards at a time. Controls:

- a class (from the selector or by clicking the legend) keeps the fields with at least one
  cell whose top class (or, with "in top three", one of its three best) is that class, and
  highlights those cells in the tables;
- sort the fields by their order in the input, by the number of cells with the class, by the
  highest confidence any of their cells gets for the class, or by the number of cells;
- the legend gives every class's colour, short and full name and how many cells have it as
  their top class;
- the address can choose the view: ``index.html#class=12&mode=top3&sort=conf``.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hpa.constants import CLASS_NAMES, NUM_CLASSES
from hpa.utils.fs import write_text
from hpa.viewer.render import SHORT_NAMES, hex_colour


@dataclass
class ViewerField:
    """One field of the page: ``href`` its picture relative to the page; ``cell_ids`` int (N,),
    ``areas`` int (N,) in field pixels, ``conf`` float (N, 19); ``note`` a line shown instead of
    a picture when the field was skipped (unreadable)."""

    image_id: str
    href: str | None
    width: int
    height: int
    cell_ids: np.ndarray
    areas: np.ndarray
    conf: np.ndarray
    note: str = ""


_CSS = """
body{font-family:system-ui,sans-serif;background:#151515;color:#ddd;margin:16px}
h1{font-size:20px;margin:0 0 6px}p.help{max-width:1100px;color:#bbb;font-size:13px;line-height:1.45}
#legend{display:flex;flex-wrap:wrap;gap:4px 10px;margin:8px 0 10px;max-width:1300px}
.lg{cursor:pointer;font-size:12.5px;padding:2px 6px;border-radius:4px;border:1px solid #333;user-select:none}
.lg.on{border-color:#fff;background:#333}.lg.none{opacity:.45}
.chip{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px;
border:1px solid #000}
#controls{margin:6px 0 12px;font-size:13.5px}#controls select{margin-right:14px;font-size:13px}
#count{color:#aaa}
.grid{display:flex;flex-direction:column;gap:14px}
.card{background:#222;border-radius:6px;padding:8px;display:grid;gap:10px;align-items:start;
grid-template-columns:minmax(0,1024px) minmax(440px,1fr)}
@media (max-width:1000px){.card{grid-template-columns:1fr}}
.card .pic{min-width:0}.card .pic img{width:100%;height:auto;display:block}
.card .side{min-width:0}.card h3{font-size:13px;margin:0 0 4px;font-family:monospace;word-break:break-all}
.card p{margin:2px 0 6px;font-size:12px;color:#aaa}
.tw{max-height:960px;overflow:auto}
table{border-collapse:collapse;font-size:11.5px;width:100%}
th,td{padding:2px 3px;text-align:left;border-bottom:1px solid #333;white-space:nowrap}
th{position:sticky;top:0;background:#222;color:#aaa;font-weight:normal}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.hit td{background:#3a3a1c}
#more{margin:14px 0;font-size:14px;padding:4px 14px}
"""

_JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const K = D.short.length, PAGE = 50;
let shown = PAGE;
const $ = id => document.getElementById(id);
function top3(c){ return c.map((v,i)=>[v,i]).sort((a,b)=>b[0]-a[0]).slice(0,3); }
D.fields.forEach(f => f.cells.forEach(c => { c.top = top3(c.conf); }));
function chip(k){ return '<span class="chip" style="background:'+D.colour[k]+'"></span>'; }
function esc(s){ return String(s).replace(/[&<>"]/g, ch => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[ch])); }
function hit(c, k, mode){ return k < 0 ? false : (mode === 'top' ? c.top[0][1] === k : c.top.some(t => t[1] === k)); }
function legend(){
  const counts = new Array(K).fill(0);
  D.fields.forEach(f => f.cells.forEach(c => counts[c.top[0][1]]++));
  const k = +$('cls').value;
  $('legend').innerHTML = D.short.map((s,i) => '<span class="lg'+(i===k?' on':'')+(counts[i]?'':' none')+
    '" data-k="'+i+'" title="'+esc(D.names[i])+'">'+chip(i)+i+' '+esc(s)+' ('+counts[i]+')</span>').join('');
  document.querySelectorAll('.lg').forEach(el => el.onclick = () => {
    $('cls').value = (+$('cls').value === +el.dataset.k) ? -1 : el.dataset.k; shown = PAGE; draw(); });
}
function draw(){
  const k = +$('cls').value, mode = $('mode').value, sort = $('sort').value;
  let fs = D.fields.map((f,i) => ({f, i, n: f.cells.filter(c => hit(c,k,mode)).length,
                                    best: k < 0 ? 0 : Math.max(0, ...f.cells.map(c => c.conf[k]))}));
  if (k >= 0) fs = fs.filter(x => x.n > 0);
  const key = {order: x => x.i, count: x => -x.n, conf: x => -x.best, cells: x => -x.f.cells.length}[sort];
  fs.sort((a,b) => key(a) - key(b) || a.i - b.i);
  $('count').textContent = 'showing ' + Math.min(shown, fs.length) + ' of ' + fs.length + ' field(s)' +
    (k >= 0 ? ' with a cell of ' + D.names[k] + (mode === 'top' ? ' as its top class' : ' in its top three') : '') +
    ' (' + D.fields.length + ' in all)';
  $('cards').innerHTML = fs.slice(0, shown).map(x => card(x.f, k, mode)).join('');
  $('more').style.display = fs.length > shown ? '' : 'none';
  legend();
}
function card(f, k, mode){
  let cells = f.cells.slice();
  if (k >= 0) cells.sort((a,b) => b.conf[k] - a.conf[k]);
  const rows = cells.map(c => '<tr'+(hit(c,k,mode)?' class="hit"':'')+' title="cell '+c.id+', '+c.area+
    ' px"><td class="n">'+c.id+'</td>'+
    c.top.map(t => '<td title="'+esc(D.names[t[1]])+'">'+chip(t[1])+esc(D.short[t[1]])+' '+t[0].toFixed(2)+'</td>')
      .join('')+'</tr>').join('');
  const pic = f.href ? '<a href="'+encodeURI(f.href)+'"><img loading="lazy" src="'+encodeURI(f.href)+
    '" alt="cells of '+esc(f.id)+'"></a>' : '<p>'+esc(f.note)+'</p>';
  return '<div class="card"><div class="pic">'+pic+'</div><div class="side"><h3>'+esc(f.id)+'</h3><p>'+
    f.width+' x '+f.height+' px, '+f.cells.length+' cell(s)'+(f.note && f.href ? ', '+esc(f.note) : '')+
    '</p><div class="tw"><table><tr><th>cell</th><th>top class</th><th>2nd</th><th>3rd</th></tr>'+
    rows+'</table></div></div></div>';
}
$('cls').innerHTML = '<option value="-1">all classes</option>' +
  D.names.map((n,i) => '<option value="'+i+'">'+i+' '+esc(n)+'</option>').join('');
// a link can choose the view: index.html#class=12&mode=top3&sort=conf
new URLSearchParams(location.hash.slice(1)).forEach((v, key) => {
  const el = {class: 'cls', mode: 'mode', sort: 'sort'}[key];
  if (el && [...$(el).options].some(o => o.value === v)) $(el).value = v; });
['cls','mode','sort'].forEach(id => $(id).onchange = () => { shown = PAGE; draw(); });
$('more').onclick = () => { shown += PAGE; draw(); };
draw();
"""


def page_data(fields: Sequence[ViewerField]) -> dict:
    """The JSON the page embeds: class names, short names, colours and every field's cells
    (``id``, ``area``, ``conf``: 19 confidences rounded to 3 decimals)."""
    out = []
    for f in fields:
        conf = np.round(np.asarray(f.conf, np.float64).reshape(-1, NUM_CLASSES), 3)
        cells = [{"id": int(i), "area": int(a), "conf": [float(v) for v in row]}
                 for i, a, row in zip(np.asarray(f.cell_ids).tolist(), np.asarray(f.areas).tolist(), conf)]
        out.append({"id": f.image_id, "href": f.href, "width": int(f.width), "height": int(f.height),
                    "note": f.note, "cells": cells})
    return {"names": list(CLASS_NAMES), "short": list(SHORT_NAMES), "colour": [hex_colour(c) for c in range(NUM_CLASSES)],
            "fields": out}


def viewer_html(fields: Sequence[ViewerField], title: str = "Cell answers", about: str = "") -> str:
    """The page's HTML (see the module docstring); ``about`` is one paragraph on where the answers come from."""
    data = json.dumps(page_data(fields), separators=(",", ":")).replace("</", "<\\/")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p class="help">Each picture shows a field as an RGB composite (microtubules red, protein green, nucleus '
        "blue, ER yellow) with every segmented cell outlined in the colour of its top class and labelled with its "
        "number, the class's short name and its confidence (only the number where the cell is crowded). The table "
        "beside it lists every cell's three most confident classes. Pick a class below, or click it in the legend, "
        "to keep the fields that have it and highlight its cells; click a picture to open it full size. "
        f"{html.escape(about)}</p>",
        '<div id="controls">class <select id="cls"></select><select id="mode"><option value="top">as top class'
        '</option><option value="top3">in top three</option></select> sort <select id="sort">'
        '<option value="order">input order</option><option value="count">cells of the class</option>'
        '<option value="conf">highest confidence for the class</option><option value="cells">number of cells'
        '</option></select> <span id="count"></span></div>',
        '<div id="legend"></div>', '<noscript><p>This page needs JavaScript to list the fields.</p></noscript>',
        '<div id="cards" class="grid"></div><button id="more">show more</button>',
        f'<script type="application/json" id="data">{data}</script>', f"<script>{_JS}</script>",
        "</body></html>"]) + "\n"


def write_viewer(path: str | os.PathLike, fields: Sequence[ViewerField], title: str = "Cell answers",
                 about: str = "") -> Path:
    """Write the page atomically; every picture it links must exist beside it (checked: no broken link)."""
    path = Path(path)
    missing = [f.href for f in fields if f.href and not (path.parent / f.href).is_file()]
    if missing:
        raise FileNotFoundError(f"viewer {path}: {len(missing)} picture(s) not found, e.g. {missing[:3]}")
    return write_text(path, viewer_html(fields, title, about))
