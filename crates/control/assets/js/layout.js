// The topology graph's layout: layered, left to right (callers before the services they
// call), with every node label and edge label given its own box so that none overlap.
//
// 1. Cycles are broken by a depth-first search from the ingress (and unknown callers): the
//    edges closing a cycle are laid out as if reversed, so every edge points forward.
// 2. Each node's column is its longest call depth from a root; nodes without traffic get a
//    column of their own at the end.
// 3. An edge spanning several columns gets a waypoint in each column it crosses: waypoints
//    take room like small nodes, so the edge passes between nodes, never through one.
// 4. Nodes and waypoints are ordered within a column by the barycenter of their neighbours
//    (a few sweeps each way), which removes most crossings.
// 5. Heights: each item wants to sit level with its neighbours; within a column the order is
//    kept and the boxes are spaced apart, with the least total displacement (an isotonic
//    regression, solved exactly by pooling adjacent violators).
// 6. Every edge label sits in the gap after the column of its edge's left end; a gap is made
//    wide enough for its widest label, and its labels are spaced like nodes in a column (same
//    method), near the height of their edge. Each edge's path runs through its label.
//
// Pure: no DOM. `measure(text, font)` gives text widths.

export const NODE_FONT = '600 12px system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif';
export const SUB_FONT = '10px system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif';
export const EDGE_FONT = SUB_FONT;

const MARGIN = 16;
const NODE_H = 38;
const NODE_PAD_X = 12;
const NODE_GAP_Y = 16;
const WAYPOINT_H = 6;
const WAYPOINT_GAP_Y = 6;
const LABEL_LINE = 12;
const LABEL_PAD = 4;
const LABEL_GAP_Y = 6;
const GAP_MARGIN = 30;
const MIN_GAP = 64;
/** Edge labels get at least this width, so that changing numbers rarely move the layout. */
const MIN_LABEL_W = 118;
const SWEEPS = 6;
const RELAXATIONS = 8;

const KIND_ORDER = { ingress: 0, unknown: 1, service: 2, egress: 3, external: 4 };

/** The two lines of a node's label. */
export function nodeLines(n) {
  const sub = [];
  if (n.kind && n.kind !== 'service') sub.push(n.kind);
  if (n.version) sub.push(n.version);
  if (!sub.length && n.namespace && n.namespace !== 'default') sub.push(n.namespace);
  return [n.service || n.id, sub.join(' · ')];
}

function byName(a, b) {
  const ka = KIND_ORDER[a.data.kind] ?? 5;
  const kb = KIND_ORDER[b.data.kind] ?? 5;
  if (ka !== kb) return ka - kb;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

/**
 * Places boxes of heights `h[i]` in this order, top to bottom, at least `gap[i]` apart
 * (between box i and i+1), as close as possible to the wanted tops `want[i]` (least squares).
 * Returns the tops.
 */
export function spaceOut(want, h, gap) {
  const n = want.length;
  if (!n) return [];
  // With offsets o[i] (the room the boxes above need), z[i] = y[i] - o[i] must not decrease:
  // an isotonic regression of want[i] - o[i].
  const offset = [0];
  for (let i = 1; i < n; i++) offset.push(offset[i - 1] + h[i - 1] + gap[i - 1]);
  const blocks = [];
  for (let i = 0; i < n; i++) {
    blocks.push({ sum: want[i] - offset[i], count: 1 });
    while (blocks.length > 1) {
      const b = blocks[blocks.length - 1];
      const a = blocks[blocks.length - 2];
      if (a.sum / a.count <= b.sum / b.count) break;
      a.sum += b.sum;
      a.count += b.count;
      blocks.pop();
    }
  }
  const y = [];
  for (const b of blocks) for (let k = 0; k < b.count; k++) y.push(b.sum / b.count + offset[y.length]);
  return y;
}

/**
 * Lays a graph out. graph: {nodes: [{id, service, version, kind, namespace}], edges:
 * [{source, target, ...}]}; edgeLines(edge) -> the edge label's lines.
 * Returns {width, height, nodes: [{id, data, x, y, w, h, rank, lines}], edges: [{data,
 * source, target, path, back, label: {x, y, w, h, lines}}]}.
 */
export function layout(graph, { measure, edgeLines }) {
  const nodes = new Map();
  const add = (data) => {
    if (!nodes.has(data.id)) nodes.set(data.id, { id: data.id, data, out: [], in: [], rank: -1 });
    return nodes.get(data.id);
  };
  for (const n of graph.nodes || []) add(n);
  const edges = [];
  for (const e of graph.edges || []) {
    // An edge naming a node the graph does not list still gets one.
    const a = add(nodes.get(e.source)?.data || { id: e.source, service: e.source, kind: 'unknown' });
    const b = add(nodes.get(e.target)?.data || { id: e.target, service: e.target, kind: 'unknown' });
    const edge = { data: e, source: a, target: b, back: false };
    edges.push(edge);
    a.out.push(edge);
    b.in.push(edge);
  }
  const all = [...nodes.values()].sort(byName);

  // 1. Break cycles: depth-first from the entry points; an edge to a node on the stack is a
  // back edge.
  const state = new Map();
  const roots = [
    ...all.filter((n) => n.data.kind === 'ingress' || n.data.kind === 'unknown'),
    ...all.filter((n) => n.in.length === 0),
    ...all,
  ];
  for (const root of roots) {
    if (state.has(root.id)) continue;
    const stack = [[root, 0]];
    state.set(root.id, 'open');
    while (stack.length) {
      const top = stack[stack.length - 1];
      const [n, i] = top;
      if (i >= n.out.length) {
        state.set(n.id, 'done');
        stack.pop();
        continue;
      }
      top[1] += 1;
      const e = n.out[i];
      const st = state.get(e.target.id);
      if (st === 'open') e.back = true;
      else if (!st) {
        state.set(e.target.id, 'open');
        stack.push([e.target, 0]);
      }
    }
  }

  // 2. Columns: longest path over forward edges.
  const connected = all.filter((n) => n.in.length || n.out.length);
  const indegree = new Map(connected.map((n) => [n.id, n.in.filter((e) => !e.back).length]));
  const queue = connected.filter((n) => indegree.get(n.id) === 0);
  for (const n of queue) n.rank = 0;
  while (queue.length) {
    const n = queue.shift();
    for (const e of n.out) {
      if (e.back) continue;
      const t = e.target;
      t.rank = Math.max(t.rank, n.rank + 1);
      indegree.set(t.id, indegree.get(t.id) - 1);
      if (indegree.get(t.id) === 0) queue.push(t);
    }
  }
  let maxRank = Math.max(-1, ...connected.map((n) => n.rank));
  const idle = all.filter((n) => !(n.in.length || n.out.length));
  if (idle.length) {
    // Without traffic the mesh still shows: ingress first, the rest in a column of their own.
    const idleRank = maxRank + 1;
    for (const n of idle) n.rank = n.data.kind === 'ingress' && maxRank >= 0 ? 0 : idleRank;
    maxRank = Math.max(maxRank, ...idle.map((n) => n.rank));
  }
  const columns = Array.from({ length: maxRank + 1 }, () => []);
  for (const n of all) {
    n.h = NODE_H;
    n.up = [];
    n.down = [];
    columns[n.rank].push(n);
  }

  // 3. Chains: each edge from its left end to its right end, with a waypoint per column crossed.
  let waypoints = 0;
  for (const e of edges) {
    const [left, right] = e.source.rank <= e.target.rank ? [e.source, e.target] : [e.target, e.source];
    e.chain = [left];
    for (let r = left.rank + 1; r < right.rank; r++) {
      const w = { id: `~${waypoints++}`, waypoint: true, rank: r, h: WAYPOINT_H, w: 0, up: [], down: [] };
      columns[r].push(w);
      e.chain.push(w);
    }
    e.chain.push(right);
    for (let i = 0; i + 1 < e.chain.length; i++) {
      const a = e.chain[i];
      const b = e.chain[i + 1];
      if (a === b) continue; // a service calling itself
      a.down.push(b);
      b.up.push(a);
    }
  }

  // 4. Order within columns by the barycenter of neighbours in the next column over.
  const position = new Map();
  for (const col of columns) col.forEach((n, i) => position.set(n, (i + 0.5) / col.length));
  const sweep = (col, key) => {
    const keys = new Map(col.map((n) => {
      const ns = n[key];
      return [n, ns.length ? ns.reduce((a, m) => a + position.get(m), 0) / ns.length : position.get(n)];
    }));
    col.sort((a, b) => keys.get(a) - keys.get(b) || position.get(a) - position.get(b));
    col.forEach((n, i) => position.set(n, (i + 0.5) / col.length));
  };
  for (let it = 0; it < SWEEPS; it++) {
    for (let r = 1; r < columns.length; r++) sweep(columns[r], 'up');
    for (let r = columns.length - 2; r >= 0; r--) sweep(columns[r], 'down');
  }

  // Node boxes, and columns as wide as their widest node.
  for (const n of all) {
    n.lines = nodeLines(n.data);
    n.w = Math.ceil(Math.max(measure(n.lines[0], NODE_FONT), measure(n.lines[1], SUB_FONT)) + 2 * NODE_PAD_X);
  }
  const colWidth = columns.map((col) => Math.max(0, ...col.map((n) => n.w)));

  // 5. Heights: start stacked, then relax towards neighbours, keeping order and spacing.
  const gapBelow = (a, b) => (a.waypoint || b.waypoint ? WAYPOINT_GAP_Y : NODE_GAP_Y);
  const place = (col, wantCenter) => {
    const ys = spaceOut(col.map((n, i) => wantCenter(n, i) - n.h / 2), col.map((n) => n.h),
      col.slice(0, -1).map((n, i) => gapBelow(n, col[i + 1])));
    col.forEach((n, i) => { n.y = ys[i]; });
  };
  for (const col of columns) {
    let y = 0;
    for (const n of col) {
      n.y = y;
      y += n.h + NODE_GAP_Y;
    }
  }
  const center = (n) => n.y + n.h / 2;
  for (let it = 0; it < RELAXATIONS; it++) {
    const order = it % 2 ? [...columns.keys()].reverse() : [...columns.keys()];
    for (const r of order) {
      place(columns[r], (n) => {
        const ns = [...n.up, ...n.down];
        return ns.length ? ns.reduce((a, m) => a + center(m), 0) / ns.length : center(n);
      });
    }
  }

  // 6. Edge labels: sizes, the gap each goes in (after the column of its left end), and
  // the gaps' widths.
  for (const e of edges) {
    const lines = edgeLines(e.data);
    const w = Math.ceil(Math.max(MIN_LABEL_W, ...lines.map((l) => measure(l, EDGE_FONT))) + 2 * LABEL_PAD);
    e.label = { lines, w, h: lines.length * LABEL_LINE + 2 * LABEL_PAD };
    e.gap = e.chain[0].rank;
  }
  const gapWidth = columns.map((_, g) => {
    const widest = Math.max(0, ...edges.filter((e) => e.gap === g).map((e) => e.label.w));
    if (g === columns.length - 1) return widest ? widest + 2 * GAP_MARGIN : 0;
    return Math.max(MIN_GAP, widest + 2 * GAP_MARGIN);
  });
  const colX = [];
  let x = MARGIN;
  for (let r = 0; r < columns.length; r++) {
    colX.push(x);
    x += colWidth[r] + gapWidth[r];
  }
  const width = x + MARGIN;
  for (let r = 0; r < columns.length; r++) {
    for (const n of columns[r]) n.x = colX[r] + (colWidth[r] - n.w) / 2;
  }
  for (let g = 0; g < columns.length; g++) {
    const inGap = edges.filter((e) => e.gap === g);
    // Level with the segment crossing the gap (between the first two items of the chain).
    const want = (e) => (center(e.chain[0]) + center(e.chain[Math.min(1, e.chain.length - 1)])) / 2;
    inGap.sort((a, b) => want(a) - want(b)
      || position.get(a.chain[0]) - position.get(b.chain[0])
      || position.get(a.chain[a.chain.length - 1]) - position.get(b.chain[b.chain.length - 1]));
    const ys = spaceOut(inGap.map((e) => want(e) - e.label.h / 2), inGap.map((e) => e.label.h), inGap.slice(1).map(() => LABEL_GAP_Y));
    inGap.forEach((e, i) => {
      e.label.y = ys[i];
      e.label.x = colX[g] + colWidth[g] + (gapWidth[g] - e.label.w) / 2;
    });
  }

  // Everything moves down so that the highest box is at the top margin.
  const tops = [...all.map((n) => n.y), ...edges.map((e) => e.label.y)];
  const shift = MARGIN - Math.min(MARGIN, ...tops);
  for (const col of columns) for (const n of col) n.y += shift;
  for (const e of edges) e.label.y += shift;

  // Paths: left to right through the label and the waypoints, then turned round for edges
  // that go right to left, so the arrow is always at the target.
  const f = (v) => v.toFixed(1);
  for (const e of edges) {
    const [first, ...rest] = e.chain;
    const l = e.label;
    const ly = l.y + l.h / 2;
    const self = e.source === e.target;
    // Points with the kind of segment leading to each: 'C' a curve, 'L' straight.
    const pts = [[first.x + first.w, center(first) - (self ? 8 : 0), 'M'], [l.x, ly, 'C'], [l.x + l.w, ly, 'L']];
    for (const n of rest) {
      if (n.waypoint) {
        pts.push([colX[n.rank], center(n), 'C'], [colX[n.rank] + colWidth[n.rank], center(n), 'L']);
      } else if (self) {
        pts.push([l.x, ly + 4, 'M'], [n.x + n.w, center(n) + 8, 'C']);
      } else {
        pts.push([n.x, center(n), 'C']);
      }
    }
    const leftToRight = e.chain[0] === e.source;
    const ordered = leftToRight || self ? pts : pts.map((p, i) => [p[0], p[1], i === pts.length - 1 ? 'M' : pts[i + 1][2]]).reverse();
    let d = '';
    let prev = null;
    for (const [px, py, kind] of ordered) {
      if (!prev || kind === 'M') d += `M${f(px)},${f(py)}`;
      else if (kind === 'L') d += `L${f(px)},${f(py)}`;
      else {
        const dx = (px - prev[0]) / 2;
        d += `C${f(prev[0] + dx)},${f(prev[1])} ${f(px - dx)},${f(py)} ${f(px)},${f(py)}`;
      }
      prev = [px, py];
    }
    e.path = d;
  }

  const right = Math.max(width, ...edges.map((e) => e.label.x + e.label.w + MARGIN));
  const bottom = Math.max(MARGIN, ...all.map((n) => n.y + n.h), ...edges.map((e) => e.label.y + e.label.h)) + MARGIN;
  return {
    width: Math.ceil(right),
    height: Math.ceil(bottom),
    nodes: all.map((n) => ({ id: n.id, data: n.data, x: n.x, y: n.y, w: n.w, h: n.h, rank: n.rank, lines: n.lines })),
    edges: edges.map((e) => ({ data: e.data, source: e.source.id, target: e.target.id, path: e.path, back: e.back, label: e.label })),
  };
}
