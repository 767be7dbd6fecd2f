// Small DOM helpers: build elements from data without innerHTML, so nothing from the API is
// ever parsed as markup.

const SVG_NS = 'http://www.w3.org/2000/svg';

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

/** Appends children: nodes, strings, numbers, arrays of those; null and false are skipped. */
export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** An HTML element: h('td', {class: 'num'}, '12'). */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replaces an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** A table inside a sideways-scrolling box. columns: [{title, class}] */
export function table(columns, rows, attrs = {}) {
  return h('div', { class: 'table-wrap' },
    h('table', attrs,
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { class: c.class }, c.title)))),
      h('tbody', {}, rows)));
}

/** An empty state message. */
export function empty(text) {
  return h('p', { class: 'empty' }, text);
}

/** A labelled statistic. */
export function card(label, value, sub, attrs = {}) {
  return h('div', { class: 'card', ...attrs }, h('div', { class: 'label' }, label),
    h('div', { class: 'value' }, value), sub ? h('div', { class: 'sub' }, sub) : null);
}

/** A small coloured label. */
export function pill(text, tone) {
  return h('span', { class: `pill ${tone || ''}` }, text);
}

/** Text width in CSS pixels for a canvas font string (the graph lays labels out with it). */
const canvas = document.createElement('canvas');
export function textWidth(text, font) {
  const ctx = canvas.getContext('2d');
  if (!ctx) return text.length * 7;
  ctx.font = font;
  return ctx.measureText(text).width;
}

/** Reads a query parameter of the current URL. */
export function param(name) {
  return new URLSearchParams(location.search).get(name);
}

/** Sets (or, with null, removes) query parameters without reloading or adding history. */
export function setParams(values) {
  const url = new URL(location.href);
  for (const [k, v] of Object.entries(values)) {
    if (v === null || v === undefined || v === '') url.searchParams.delete(k);
    else url.searchParams.set(k, v);
  }
  history.replaceState(history.state, '', url.pathname + url.search);
}

/**
 * Re-renders `container` with `render()`, keeping open the <details> of elements that carry
 * the same `data-resource` before and after (a refresh must not fold what the user opened).
 */
export function keepOpen(container, render) {
  const open = new Set();
  for (const d of container.querySelectorAll('details[open]')) {
    const owner = d.closest('[data-resource]');
    if (owner) open.add(owner.getAttribute('data-resource'));
  }
  render();
  for (const el of container.querySelectorAll('[data-resource]')) {
    if (!open.has(el.getAttribute('data-resource'))) continue;
    const d = el.querySelector('details');
    if (d) d.open = true;
  }
}

/** Returns a function telling whether a value differs from the one it saw last. */
export function changes() {
  let last;
  return (value) => {
    const text = JSON.stringify(value);
    if (text === last) return false;
    last = text;
    return true;
  };
}
