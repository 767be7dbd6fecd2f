// Hand-written SVG charts: time series, sparklines and latency histograms.

import { s } from '/assets/js/dom.js';
import { duration } from '/assets/js/format.js';

/** An SVG path through the points, broken where a value is null. */
function pathOf(points) {
  let d = '';
  let pen = false;
  for (const [x, y] of points) {
    if (y === null || y === undefined || Number.isNaN(y)) {
      pen = false;
      continue;
    }
    d += `${pen ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`;
    pen = true;
  }
  return d;
}

function finite(values) {
  return values.filter((v) => v !== null && v !== undefined && Number.isFinite(v));
}

/**
 * A time-series chart.
 * times: Unix ms per point; series: [{values, label, b}] (b: the second colour);
 * format: value -> text; yMin/yMax fix the scale (else it follows the data, from 0).
 */
export function lineChart({ times, series, title, format = String, yMin, yMax, width = 320, height = 130, attrs = {} }) {
  const m = { l: 46, r: 8, t: 20, b: 18 };
  const w = width - m.l - m.r;
  const ht = height - m.t - m.b;
  const all = finite(series.flatMap((x) => x.values));
  let lo = yMin !== undefined ? yMin : 0;
  let hi = yMax !== undefined ? yMax : Math.max(...all, lo);
  if (typeof yMin === 'function') lo = yMin(all);
  if (!(hi > lo)) hi = lo + 1;
  const n = times.length;
  const t0 = times[0] || 0;
  const t1 = times[n - 1] || t0 + 1;
  const x = (t) => m.l + (n > 1 ? ((t - t0) / (t1 - t0)) * w : w);
  const y = (v) => m.t + ht - ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo)) * ht;
  const last = series.length ? finite(series[0].values).at(-1) : undefined;
  const svg = s('svg', { class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title, ...attrs },
    s('text', { class: 'title', x: 0, y: 12 }, `${title}${last !== undefined ? ` · ${format(last)}` : ''}`),
    s('line', { class: 'axis', x1: m.l, y1: m.t + ht, x2: m.l + w, y2: m.t + ht }),
    s('line', { class: 'axis', x1: m.l, y1: m.t, x2: m.l, y2: m.t + ht }),
    s('text', { x: m.l - 4, y: m.t + 4, 'text-anchor': 'end' }, format(hi)),
    s('text', { x: m.l - 4, y: m.t + ht, 'text-anchor': 'end' }, format(lo)),
    // Each point ends a step: the chart covers one step more than its first and last points.
    s('text', { x: m.l, y: height - 4 }, n > 1 ? `-${duration(((t1 - t0) * n) / (n - 1) / 1000)}` : ''),
    s('text', { x: m.l + w, y: height - 4, 'text-anchor': 'end' }, 'now'));
  for (const one of series) {
    const pts = one.values.map((v, i) => [x(times[i]), v === null || v === undefined ? null : y(v)]);
    svg.append(s('path', { class: `line${one.b ? ' b' : ''}`, d: pathOf(pts) }, s('title', {}, one.label || title)));
  }
  if (!all.length) {
    svg.append(s('text', { x: m.l + w / 2, y: m.t + ht / 2, 'text-anchor': 'middle' }, 'no requests'));
  }
  return svg;
}

/** A tiny line of the values (nulls as gaps), scaled from 0 to their maximum. */
export function sparkline(values, { width = 110, height = 24, label = '' } = {}) {
  const all = finite(values);
  const hi = Math.max(...all, 0) || 1;
  const n = values.length;
  const x = (i) => (n > 1 ? (i / (n - 1)) * (width - 2) + 1 : width / 2);
  const y = (v) => height - 2 - (v / hi) * (height - 4);
  const pts = values.map((v, i) => [x(i), v === null || v === undefined ? null : y(v)]);
  const line = pathOf(pts);
  const svg = s('svg', { class: 'spark', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': label });
  if (line) {
    // The area closes under the first and last points that have a value.
    const known = values.map((v, i) => (v === null || v === undefined ? -1 : i)).filter((i) => i >= 0);
    const first = known[0];
    const last = known[known.length - 1];
    const area = `${line}L${x(last).toFixed(1)},${height - 1}L${x(first).toFixed(1)},${height - 1}Z`;
    svg.append(s('path', { class: 'area', d: area }), s('path', { class: 'line', d: line }));
  }
  svg.append(s('title', {}, label));
  return svg;
}

const LOG_TICKS = [1, 2, 5];

/** Log-spaced bin edges (ms) covering lo..hi. */
function logBins(lo, hi, count) {
  const a = Math.log10(Math.max(lo, 0.001));
  const b = Math.log10(Math.max(hi, lo * 1.01, 0.002));
  const edges = [];
  for (let i = 0; i <= count; i++) edges.push(10 ** (a + ((b - a) * i) / count));
  return edges;
}

function msLabel(v) {
  if (v >= 1000) return `${Number((v / 1000).toPrecision(2))}s`;
  if (v >= 1) return `${Number(v.toPrecision(2))}ms`;
  return `${Number((v * 1000).toPrecision(2))}µs`;
}

/**
 * A latency distribution: runs [{label, buckets: [[value_us, count], ...], b}] share one
 * log-scaled axis; each run's bars are shares of its own requests, so runs of different
 * sizes compare.
 */
export function histogram(runs, { width = 900, height = 240, title = 'Latency distribution', attrs = {} } = {}) {
  const m = { l: 40, r: 10, t: 20, b: 22 };
  const w = width - m.l - m.r;
  const ht = height - m.t - m.b;
  const svg = s('svg', { class: 'chart histogram', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title, ...attrs },
    s('text', { class: 'title', x: 0, y: 12 }, title));
  const values = runs.flatMap((r) => (r.buckets || []).filter(([, c]) => c > 0).map(([v]) => v / 1000));
  if (!values.length) {
    svg.append(s('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle' }, 'no histogram in this result'));
    return svg;
  }
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const binCount = Math.max(8, Math.min(48, Math.floor(w / (runs.length > 1 ? 10 : 12))));
  const edges = logBins(lo * 0.98, hi * 1.02, binCount);
  const shares = runs.map((r) => {
    const counts = new Array(binCount).fill(0);
    let total = 0;
    for (const [v, c] of r.buckets || []) {
      const msv = v / 1000;
      let i = edges.findIndex((e, k) => k > 0 && msv <= e) - 1;
      if (i < 0) i = msv < edges[0] ? 0 : binCount - 1;
      counts[i] += c;
      total += c;
    }
    return counts.map((c) => (total ? c / total : 0));
  });
  const top = Math.max(...shares.flat(), 0.0001);
  const lx = (v) => m.l + ((Math.log10(v) - Math.log10(edges[0])) / (Math.log10(edges[binCount]) - Math.log10(edges[0]))) * w;
  const y = (v) => m.t + ht - (v / top) * ht;
  svg.append(
    s('line', { class: 'axis', x1: m.l, y1: m.t + ht, x2: m.l + w, y2: m.t + ht }),
    s('line', { class: 'axis', x1: m.l, y1: m.t, x2: m.l, y2: m.t + ht }),
    s('text', { x: m.l - 4, y: m.t + 4, 'text-anchor': 'end' }, `${(top * 100).toPrecision(2)}%`),
    s('text', { x: m.l - 4, y: m.t + ht, 'text-anchor': 'end' }, '0'));
  // Decade ticks (1, 2, 5 × 10^k ms) inside the range.
  for (let e = Math.floor(Math.log10(edges[0])); e <= Math.ceil(Math.log10(edges[binCount])); e++) {
    for (const t of LOG_TICKS) {
      const v = t * 10 ** e;
      if (v < edges[0] || v > edges[binCount]) continue;
      const tx = lx(v);
      svg.append(s('line', { class: 'axis', x1: tx, y1: m.t + ht, x2: tx, y2: m.t + ht + 3 }),
        s('text', { x: tx, y: height - 6, 'text-anchor': 'middle' }, msLabel(v)));
    }
  }
  shares.forEach((share, ri) => {
    const run = runs[ri];
    const g = s('g', { 'data-run': run.label });
    if (runs.length === 1) {
      share.forEach((v, i) => {
        if (!v) return;
        const x0 = lx(edges[i]);
        const x1 = lx(edges[i + 1]);
        g.append(s('rect', { class: 'bar', x: x0 + 0.5, y: y(v), width: Math.max(1, x1 - x0 - 1), height: m.t + ht - y(v) },
          s('title', {}, `${msLabel(edges[i])}–${msLabel(edges[i + 1])}: ${(v * 100).toFixed(2)}%`)));
      });
    } else {
      let d = `M${lx(edges[0]).toFixed(1)},${(m.t + ht).toFixed(1)}`;
      share.forEach((v, i) => {
        d += `L${lx(edges[i]).toFixed(1)},${y(v).toFixed(1)}L${lx(edges[i + 1]).toFixed(1)},${y(v).toFixed(1)}`;
      });
      d += `L${lx(edges[binCount]).toFixed(1)},${(m.t + ht).toFixed(1)}`;
      g.append(s('path', { class: `line${run.b ? ' b' : ''}`, d }, s('title', {}, run.label)));
    }
    svg.append(g);
  });
  return svg;
}
