// Rendering resources (routes, policies) and the `check` findings about them.

import { h, pill } from '/assets/js/dom.js';

/** The namespace of a resource (`default` when absent; MeshConfig has none). */
export function namespaceOf(r) {
  return r.metadata.namespace || (r.kind === 'MeshConfig' ? '' : 'default');
}

/** `NAMESPACE/NAME` (just NAME for cluster-scoped kinds). */
export function keyOf(r) {
  const ns = namespaceOf(r);
  return ns ? `${ns}/${r.metadata.name}` : r.metadata.name;
}

/** The findings about one resource. */
export function findingsFor(findings, r) {
  return (findings || []).filter((f) => f.kind === r.kind && f.name === r.metadata.name
    && (f.namespace === namespaceOf(r) || (!f.namespace && !namespaceOf(r))));
}

/** A list of findings (✗ errors, ‼ warnings) with their hints. */
export function findingList(findings, { withObject = false } = {}) {
  if (!findings.length) return null;
  return h('ul', { class: 'findings' }, findings.map((f) => h('li', { class: f.severity, 'data-finding': f.severity },
    h('strong', { class: f.severity === 'error' ? 'bad' : 'warn' }, f.severity === 'error' ? '✗ ' : '‼ '),
    withObject ? h('strong', {}, `${f.object}: `) : null, f.message,
    f.hint ? h('div', { class: 'hint' }, `hint: ${f.hint}`) : null)));
}

/** A one-line description of a scalar, list or small object. */
export function brief(v) {
  if (v === null || v === undefined) return '—';
  if (Array.isArray(v)) return v.map(brief).join(', ');
  if (typeof v === 'object') return Object.entries(v).map(([k, x]) => `${k} ${brief(x)}`).join(', ');
  return String(v);
}

/** Definition-list rows for an object's fields (nested objects flattened as `a.b`). */
export function fields(obj, skip = []) {
  const rows = [];
  const walk = (o, prefix) => {
    for (const [k, v] of Object.entries(o || {})) {
      if (!prefix && skip.includes(k)) continue;
      const name = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length <= 6 && Object.values(v).every((x) => typeof x !== 'object' || x === null)) {
        rows.push([name, brief(v)]);
      } else if (v && typeof v === 'object' && !Array.isArray(v)) {
        walk(v, name);
      } else {
        rows.push([name, brief(v)]);
      }
    }
  };
  walk(obj, '');
  return rows;
}

export function dl(rows) {
  if (!rows.length) return null;
  return h('dl', {}, rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

/** `kind/name:port` of a reference. */
export function refText(ref) {
  if (!ref) return '—';
  const kind = ref.kind && ref.kind !== 'Service' ? `${ref.kind} ` : '';
  const ns = ref.namespace ? `${ref.namespace}/` : '';
  return `${kind}${ns}${ref.name}${ref.port ? `:${ref.port}` : ''}${ref.route ? ` route ${ref.route}` : ''}${ref.sectionName ? ` (${ref.sectionName})` : ''}`;
}

/** A card for one resource: header, body, its findings and the full spec on demand. */
export function resourceCard(r, findings, body) {
  const errors = findings.filter((f) => f.severity === 'error').length;
  const tone = errors ? 'bad' : findings.length ? 'warn' : 'ok';
  return h('article', { class: `resource${errors ? ' has-error' : ''}`, 'data-kind': r.kind, 'data-resource': `${r.kind}/${keyOf(r)}` },
    h('header', {}, pill(r.kind), h('span', { class: 'name' }, keyOf(r)),
      pill(errors ? `${errors} error${errors > 1 ? 's' : ''}` : findings.length ? `${findings.length} warning${findings.length > 1 ? 's' : ''}` : 'no findings', tone)),
    body,
    findingList(findings),
    h('details', {}, h('summary', {}, 'spec'), h('pre', {}, JSON.stringify(r.spec, null, 2))));
}
