// Draws the heatmaps of an llmcli report (llmcli/report_html.py) on canvases; no network, no library.
"use strict";
(function () {
  const started = performance.now();
  const figures = JSON.parse(document.getElementById("figures").textContent);
  const tip = document.getElementById("tip");
  const FONT = "11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";

  // Colour maps as stops between 0 and 1 (viridis and magma sampled; "blues" for shares).
  const PALETTES = {
    viridis: ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"],
    magma: ["#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668", "#feca8d", "#fcfdbf"],
    blues: ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"],
  };
  const rgbCache = {};
  function stops(name) {
    if (!rgbCache[name]) {
      rgbCache[name] = (PALETTES[name] || PALETTES.viridis).map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
    }
    return rgbCache[name];
  }
  function colour(name, t) {
    const s = stops(name);
    const x = Math.max(0, Math.min(1, t)) * (s.length - 1);
    const i = Math.min(s.length - 2, Math.floor(x));
    const f = x - i;
    return s[i].map((c, k) => Math.round(c + (s[i + 1][k] - c) * f));
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(4) : String(+v.toPrecision(6));
  }

  // Cell text cut to the cell's width; tokens repeat across layers, so each is measured once per width.
  const fits = new Map();
  function fitted(ctx, text, width) {
    const key = width + "\u0000" + text;
    let out = fits.get(key);
    if (out === undefined) {
      out = text;
      while (out.length > 1 && ctx.measureText(out).width > width) out = out.slice(0, -1);
      fits.set(key, out);
    }
    return out;
  }

  function range(fig) {
    let lo = Infinity, hi = -Infinity;
    for (const row of fig.values) for (const v of row) {
      if (v === null || (fig.scale === "log" && v <= 0)) continue;
      const x = fig.scale === "log" ? Math.log10(v) : v;
      if (x < lo) lo = x;
      if (x > hi) hi = x;
    }
    if (fig.vmin !== null) lo = fig.scale === "log" ? Math.log10(fig.vmin) : fig.vmin;
    if (fig.vmax !== null) hi = fig.scale === "log" ? Math.log10(fig.vmax) : fig.vmax;
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (hi <= lo) hi = lo + 1;
    return [lo, hi];
  }

  function layout(fig, width, ctx) {
    ctx.font = FONT;
    const rowLabel = Math.min(160, 8 + Math.max(0, ...fig.rows.map((r) => ctx.measureText(r).width)));
    const colLabel = Math.min(110, 8 + Math.max(0, ...fig.cols.map((c) => ctx.measureText(c).width)));
    const n = fig.cols.length;
    const minCell = fig.cells ? 46 : 3;
    const cw = Math.max(minCell, Math.min(fig.cells ? 96 : 40, Math.floor((width - rowLabel - 10) / n)));
    const ch = fig.cells ? 18 : Math.max(6, Math.min(18, Math.floor(560 / fig.rows.length)));
    const labelEvery = Math.max(1, Math.ceil(13 / cw));
    const top = labelEvery > 1 ? 16 : colLabel * 0.71 + 6; // rotated labels need height, numbers do not
    return { rowLabel, top, cw, ch, labelEvery, w: rowLabel + cw * n + 8, h: top + ch * fig.rows.length + 4 };
  }

  function draw(fig, holder) {
    const title = document.createElement("h3");
    title.textContent = fig.title;
    holder.appendChild(title);
    if (fig.note) {
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = fig.note;
      holder.appendChild(note);
    }
    const canvas = document.createElement("canvas");
    const ctx = canvas.getContext("2d");
    const L = layout(fig, Math.max(600, holder.clientWidth || 1000), ctx);
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.ceil(L.w * dpr);
    canvas.height = Math.ceil(L.h * dpr);
    canvas.style.width = L.w + "px";
    canvas.style.height = L.h + "px";
    ctx.scale(dpr, dpr);
    ctx.font = FONT;
    const [lo, hi] = range(fig);
    const norm = (v) => ((fig.scale === "log" ? Math.log10(v) : v) - lo) / (hi - lo);
    ctx.textBaseline = "middle";
    fig.rows.forEach((label, r) => {
      ctx.fillStyle = "#333";
      ctx.textAlign = "right";
      ctx.fillText(label, L.rowLabel - 6, L.top + r * L.ch + L.ch / 2);
      fig.values[r].forEach((v, c) => {
        const x = L.rowLabel + c * L.cw, y = L.top + r * L.ch;
        if (v === null || (fig.scale === "log" && v <= 0)) {
          ctx.fillStyle = "#eee";
          ctx.fillRect(x, y, L.cw - (L.cw > 4 ? 1 : 0), L.ch - 1);
          return;
        }
        const rgb = colour(fig.palette, norm(v));
        ctx.fillStyle = `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
        ctx.fillRect(x, y, L.cw - (L.cw > 4 ? 1 : 0), L.ch - 1);
        if (fig.cells && fig.cells[r][c]) {
          const light = rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114 > 140;
          ctx.fillStyle = light ? "#000" : "#fff";
          ctx.textAlign = "center";
          ctx.fillText(fitted(ctx, fig.cells[r][c], L.cw - 4), x + L.cw / 2, y + L.ch / 2);
        }
      });
    });
    ctx.fillStyle = "#333";
    fig.cols.forEach((label, c) => {
      if (c % L.labelEvery) return;
      const x = L.rowLabel + c * L.cw + L.cw / 2;
      ctx.save();
      if (L.labelEvery > 1) {
        ctx.textAlign = "left";
        ctx.fillText(label, x - 2, 8);
      } else {
        ctx.translate(x, L.top - 4);
        ctx.rotate(-Math.PI / 4);
        ctx.textAlign = "left";
        ctx.fillText(label, 0, 0);
      }
      ctx.restore();
    });
    canvas.dataset.layout = JSON.stringify(L); // cell geometry, for tests and scripts that point at a cell
    holder.appendChild(canvas);
    holder.appendChild(legend(fig, lo, hi));
    canvas.addEventListener("mousemove", (e) => hover(e, fig, L, canvas));
    canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  }

  function legend(fig, lo, hi) {
    const box = document.createElement("div");
    box.className = "legend";
    const bar = document.createElement("span");
    bar.className = "ramp";
    const s = PALETTES[fig.palette] || PALETTES.viridis;
    bar.style.background = `linear-gradient(to right, ${s.join(",")})`;
    const edge = (x) => fmt(fig.scale === "log" ? Math.pow(10, x) : x);
    const left = document.createElement("span");
    left.textContent = `${fig.value_name}${fig.scale === "log" ? " (log scale)" : ""}: ${edge(lo)}`;
    const right = document.createElement("span");
    right.textContent = edge(hi);
    box.append(left, bar, right);
    return box;
  }

  function hover(e, fig, L, canvas) {
    const rect = canvas.getBoundingClientRect();
    const c = Math.floor((e.clientX - rect.left - L.rowLabel) / L.cw);
    const r = Math.floor((e.clientY - rect.top - L.top) / L.ch);
    if (r < 0 || c < 0 || r >= fig.rows.length || c >= fig.cols.length) { tip.hidden = true; return; }
    const lines = [`${fig.row_name} ${fig.rows[r]} · ${fig.col_name} ${fig.cols[c]}`,
      `${fig.value_name} = ${fmt(fig.values[r][c])}`];
    if (fig.cells && fig.cells[r][c]) lines.splice(1, 0, fig.cells[r][c]);
    if (fig.tips && fig.tips[r][c]) lines.push(fig.tips[r][c]);
    tip.textContent = lines.join("\n");
    tip.hidden = false;
    tip.style.left = Math.min(window.innerWidth - tip.offsetWidth - 8, e.clientX + 14) + window.scrollX + "px";
    tip.style.top = e.clientY + 14 + window.scrollY + "px";
  }

  document.querySelectorAll("[data-fig]").forEach((holder) => draw(figures[+holder.dataset.fig], holder));
  document.body.dataset.renderedMs = (performance.now() - started).toFixed(1);
  document.body.dataset.figures = String(figures.length);
})();
