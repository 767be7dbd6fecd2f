// /certificates: the trust anchor(s), the issuer, a rotation in progress, and each proxy's
// workload certificate with its expiry (/api/v1/identity).

import { get } from '/assets/js/api.js';
import { h, replace, table, empty, pill } from '/assets/js/dom.js';
import { duration, datetime } from '/assets/js/format.js';

/** CA certificates (anchor, issuer) expiring within this many days are flagged. */
const CA_WARN_DAYS = 60;

/** Seconds in a duration such as `24h`, `90m`, `1h30m`. */
function seconds(text) {
  if (!text) return null;
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/g;
  let m;
  let any = false;
  while ((m = re.exec(text))) {
    any = true;
    total += Number(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 }[m[2]];
  }
  return any ? total : null;
}

function caTone(c) {
  if (!c) return 'bad';
  if (c.expiresInSeconds <= 0) return 'bad';
  return c.expiresInSeconds < CA_WARN_DAYS * 86400 ? 'warn' : 'ok';
}

/** A leaf is rotated at half its lifetime: under a third left means rotation is late. */
function leafTone(remaining, lifetime) {
  if (remaining === null || remaining === undefined) return '';
  if (remaining <= 0) return 'bad';
  if (!lifetime) return 'ok';
  if (remaining < lifetime * 0.1) return 'bad';
  return remaining < lifetime / 3 ? 'warn' : 'ok';
}

function caCard(title, c, extra) {
  if (!c) return h('div', { class: 'panel' }, h('h2', {}, title), h('p', { class: 'bad' }, 'missing'));
  const tone = caTone(c);
  return h('div', { class: 'panel', 'data-cert': title.toLowerCase().replace(/\s+/g, '-'), 'data-tone': tone },
    h('h2', {}, title, ' ', pill(c.expiresInSeconds <= 0 ? 'expired' : `${duration(c.expiresInSeconds)} left`, tone)),
    h('dl', { class: 'kv' },
      [['subject', c.subject], ['issuer', c.issuer], ['serial', h('span', { class: 'mono' }, c.serial)],
        ['valid from', datetime(c.notBefore)], ['valid until', datetime(c.notAfter)],
        ['SHA-256', h('span', { class: 'mono' }, (c.sha256 || '').slice(0, 16) + '…')], ...(extra || [])]
        .flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
    tone === 'warn' ? h('p', { class: 'warn' }, `Expires within ${CA_WARN_DAYS} days: rotate it (plexus identity rotate${title.includes('anchor') ? ' --anchor' : ''}).`) : null,
    tone === 'bad' ? h('p', { class: 'bad' }, 'Expired: no workload certificate chains to it.') : null);
}

export default {
  title: 'Certificates',
  mount(root) {
    const body = h('div', {});
    root.append(h('h1', {}, 'Certificates'), body);
    const refresh = async () => {
      const id = await get('/api/v1/identity');
      const lifetime = seconds(id.leafLifetime);
      const proxies = [...(id.proxies || [])].sort((a, b) => (a.expiresInSeconds ?? Infinity) - (b.expiresInSeconds ?? Infinity));
      const bundle = id.trustBundle || [];
      replace(body,
        h('p', { class: 'muted' }, `Trust domain ${id.trustDomain || '—'} · workload certificates live ${id.leafLifetime || '—'} and are renewed at half-life.`),
        id.rotation ? h('div', { class: 'panel', 'data-rotation': id.rotation.kind },
          h('h2', {}, 'Rotation in progress ', pill(id.rotation.kind, 'warn')),
          h('p', {}, `Since ${datetime(id.rotation.since)}: ${id.rotation.proxiesOnNewIssuer} proxies on the new issuer, ${id.rotation.proxiesOnOldIssuer} still on the old one.`)) : null,
        h('div', { class: 'split' },
          caCard('Trust anchor', id.trustAnchor, [['in the data dir', id.anchorKeyInDataDir ? 'key and certificate' : 'certificate only']]),
          caCard('Issuer', id.issuer, [['signed by the anchor', id.issuerSignedByAnchor ? pill('yes', 'ok') : pill('no', 'bad')],
            ['in use', id.issuer && id.issuerInUseSha256 === id.issuer.sha256 ? pill('yes', 'ok') : pill('a different issuer is in use', 'warn')]])),
        bundle.length > 1 ? [h('h2', {}, 'Trust bundle'), table([{ title: 'subject' }, { title: 'valid until' }, { title: 'left', class: 'num' }],
          bundle.map((c) => h('tr', {}, h('td', {}, c.subject), h('td', {}, datetime(c.notAfter)), h('td', { class: `num ${caTone(c)}` }, duration(c.expiresInSeconds)))))] : null,
        h('h2', {}, 'Workload certificates'),
        proxies.length ? table(
          [{ title: 'workload' }, { title: 'service' }, { title: 'mode' }, { title: 'identity' }, { title: 'serial' }, { title: 'valid until' }, { title: 'left', class: 'num' }, { title: 'issued by' }],
          proxies.map((p) => {
            const tone = leafTone(p.expiresInSeconds, lifetime);
            return h('tr', { 'data-workload': p.workload, 'data-tone': tone },
              h('td', {}, p.workload), h('td', {}, p.service || '—'), h('td', {}, p.mode || '—'),
              h('td', { class: 'mono' }, p.spiffeId || 'none reported'), h('td', { class: 'mono' }, (p.serial || '—').slice(0, 12)),
              h('td', {}, p.notAfter ? datetime(p.notAfter) : '—'),
              h('td', { class: `num ${tone}` }, p.expiresInSeconds === null || p.expiresInSeconds === undefined ? '—' : duration(p.expiresInSeconds)),
              h('td', {}, pill(p.issuedBy || '—', p.issuedBy === 'current' ? 'ok' : 'warn')));
          })) : empty('No proxy is connected.'));
    };
    // Certificates change slowly; the time left is shown in minutes at best.
    return { refresh, period: 5000 };
  },
};
