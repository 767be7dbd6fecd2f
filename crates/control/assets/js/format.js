// Number and time formatting shared by the pages.

/** Requests per second: three significant digits (so a shown number is within 0.5%). */
export function rate(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return '—';
  if (v === 0) return '0';
  if (v >= 100) return Math.round(v).toLocaleString('en-US');
  return Number(v.toPrecision(3)).toString();
}

/** A 0..1 share as a percentage. */
export function pct(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return '—';
  const p = v * 100;
  if (p === 100 || p === 0) return `${p}%`;
  return `${p >= 99.9 ? p.toFixed(2) : p.toFixed(1)}%`;
}

/** Milliseconds. */
export function ms(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return '—';
  if (v >= 1000) return `${(v / 1000).toPrecision(3)} s`;
  if (v >= 100) return `${Math.round(v)} ms`;
  return `${Number(v.toPrecision(3))} ms`;
}

/** A count with thousands separators. */
export function count(v) {
  if (v === null || v === undefined) return '—';
  return Number(v).toLocaleString('en-US');
}

/** Seconds as the largest sensible unit: 3d 4h, 5h 10m, 12m, 40s. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  const neg = seconds < 0;
  let s = Math.abs(Math.round(seconds));
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  let out;
  if (d > 0) out = h ? `${d}d ${h}h` : `${d}d`;
  else if (h > 0) out = m ? `${h}h ${m}m` : `${h}h`;
  else if (m > 0) out = `${m}m`;
  else out = `${s}s`;
  return neg ? `-${out}` : out;
}

/** A time of day (local), for "updated at". */
export function clock(date) {
  return date.toLocaleTimeString('en-GB', { hour12: false });
}

/** A date and time (local) from an RFC 3339 string or Unix milliseconds. */
export function datetime(v) {
  if (v === null || v === undefined || v === '') return '—';
  const d = new Date(v);
  if (Number.isNaN(d.getTime())) return String(v);
  return d.toLocaleString('en-GB', { hour12: false });
}

/** The tone of a success rate: ok, warn (below 99%) or bad (below 95%); '' without traffic. */
export function successTone(v) {
  if (v === null || v === undefined) return '';
  if (v >= 0.99) return 'ok';
  if (v >= 0.95) return 'warn';
  return 'bad';
}
