// /policies: AuthorizationPolicies, ResiliencePolicies, RateLimitPolicies, the MeshConfig,
// FaultInjections, SMI TrafficTargets and ExternalServices, with `plexus check` findings.

import { getAll } from '/assets/js/api.js';
import { h, replace, empty, pill, keepOpen, changes } from '/assets/js/dom.js';
import { resourceCard, findingsFor, findingList, refText, brief, dl, fields } from '/assets/js/resources.js';

function peers(from) {
  if (!from) return 'anyone';
  const parts = [];
  if ((from.identities || []).length) parts.push(`identities ${from.identities.join(', ')}`);
  if ((from.serviceAccounts || []).length) parts.push(`service accounts ${from.serviceAccounts.join(', ')}`);
  if ((from.namespaces || []).length) parts.push(`namespaces ${from.namespaces.join(', ')}`);
  if (from.unauthenticated) parts.push('unauthenticated callers');
  return parts.join(' or ') || 'anyone';
}

function targets(to) {
  if (!to) return 'anything';
  const parts = [];
  if ((to.paths || []).length) parts.push(`paths ${to.paths.join(', ')}`);
  if ((to.methods || []).length) parts.push(`methods ${to.methods.join(', ')}`);
  if ((to.ports || []).length) parts.push(`ports ${to.ports.join(', ')}`);
  return parts.join(' and ') || 'anything';
}

function authorization(r) {
  const spec = r.spec || {};
  const tone = spec.action === 'deny' ? 'bad' : spec.action === 'audit' ? 'warn' : 'ok';
  return h('div', {},
    dl([['target', refText(spec.targetRef)], ['action', pill(spec.action || 'allow', tone)]]),
    (spec.rules || []).length
      ? h('ul', {}, spec.rules.map((rule) => h('li', {}, `from ${peers(rule.from)} to ${targets(rule.to)}`)))
      : h('p', { class: 'muted' }, spec.action === 'deny' ? 'no rules: denies nothing' : 'no rules: matches no request'));
}

function withTarget(r) {
  return dl([['target', refText((r.spec || {}).targetRef)], ...fields(r.spec, ['targetRef'])]);
}

function rateLimit(r) {
  const spec = r.spec || {};
  return dl([
    ['target', refText(spec.targetRef)],
    ['limit', `${spec.requestsPerSecond ?? '—'} requests/s, burst ${spec.burst ?? '—'}`],
    ...fields(spec, ['targetRef', 'requestsPerSecond', 'burst']),
  ]);
}

function trafficTarget(r) {
  const spec = r.spec || {};
  return dl([
    ['destination', refText(spec.destination)],
    ['sources', (spec.sources || []).map(refText).join(', ') || '—'],
    ['rules', (spec.rules || []).map((x) => `${x.kind || ''} ${x.name}${(x.matches || []).length ? ` (${x.matches.join(', ')})` : ''}`).join(', ') || '—'],
  ]);
}

const SECTIONS = [
  ['authorizationpolicies', 'AuthorizationPolicies', authorization],
  ['resiliencepolicies', 'ResiliencePolicies', withTarget],
  ['ratelimitpolicies', 'RateLimitPolicies', rateLimit],
  ['meshconfigs', 'MeshConfig', (r) => dl(fields(r.spec)) || h('p', { class: 'muted' }, 'every field at its default')],
  ['faultinjections', 'FaultInjections', (r) => dl(fields(r.spec))],
  ['traffictargets', 'TrafficTargets (SMI)', trafficTarget],
  ['externalservices', 'ExternalServices', (r) => dl(fields(r.spec).map(([k, v]) => [k, brief(v)]))],
];

const KINDS = ['AuthorizationPolicy', 'ResiliencePolicy', 'RateLimitPolicy', 'MeshConfig', 'FaultInjection', 'TrafficTarget', 'ExternalService'];

export default {
  title: 'Policies',
  mount(root) {
    const body = h('div', {});
    root.append(h('h1', {}, 'Policies'),
      h('p', { class: 'muted' }, 'Authorization, resilience and rate limits per Service, the mesh-wide MeshConfig, faults and external services, with what plexus check finds wrong with each.'),
      body);
    const changed = changes();
    const refresh = async () => {
      const paths = Object.fromEntries(SECTIONS.map(([k]) => [k, `/api/v1/resources/${k}?namespace=all`]));
      const d = await getAll({ ...paths, findings: '/api/v1/findings' });
      if (!changed(d)) return;
      const findings = d.findings.findings || [];
      const mine = findings.filter((f) => KINDS.includes(f.kind));
      const errors = mine.filter((f) => f.severity === 'error').length;
      const total = SECTIONS.reduce((a, [k]) => a + (d[k].items || []).length, 0);
      keepOpen(body, () => replace(body,
        h('p', {}, `${total} polic${total === 1 ? 'y' : 'ies'} · `,
          mine.length ? pill(`${errors} error${errors === 1 ? '' : 's'}, ${mine.length - errors} warning${mine.length - errors === 1 ? '' : 's'}`, errors ? 'bad' : 'warn') : pill('no findings', 'ok')),
        (d.meshconfigs.items || []).length ? null : h('p', { class: 'muted' }, 'No MeshConfig: mTLS permissive, authorization allow, outbound traffic allowed anywhere (the defaults).'),
        total ? null : empty('No policies: requests are allowed, and retried only on connection failures.'),
        SECTIONS.filter(([k]) => (d[k].items || []).length).map(([k, title, render]) => [
          h('h2', {}, title),
          h('div', { class: 'resources' }, d[k].items.map((r) => {
            const card = resourceCard(r, findingsFor(findings, r), render(r));
            card.setAttribute('data-policy', `${r.kind}/${r.metadata.namespace || ''}/${r.metadata.name}`);
            return card;
          })),
        ]),
        findingList(mine.filter((f) => !SECTIONS.some(([k]) => (d[k].items || []).some((r) => findingsFor([f], r).length))), { withObject: true })));
    };
    return { refresh };
  },
};
