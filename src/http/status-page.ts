/**
 * The status page at / on the metrics port: every source of this process in one table — state,
 * lag, the WAL its slot retains, checkpoint age, events/s, restarts, last error. Rendered here,
 * as plain HTML: it works with JavaScript off (a <noscript> refresh reloads it), and with
 * JavaScript on a few lines fetch the page again every 2 s and swap the table in, so there is one
 * renderer and no build step. Nothing on it is a secret: it shows what /readyz shows.
 */
import { humanSeconds } from '../commands/output.js';
import { formatBytes } from '../common/lsn.js';
import type { SourceReport } from '../supervisor/source-runner.js';

export interface StatusPageData {
  readonly ready: boolean;
  readonly version: string;
  readonly buffer: { readonly state: string; readonly problem?: string | null };
  readonly sources: readonly SourceReport[];
  readonly now: number;
}

const REFRESH_SECONDS = 2;

/** States and WAL statuses that need a person, and those on the way there. */
const BAD = new Set(['failed', 'lost', 'unreserved']);
const WARN = new Set(['backoff', 'starting', 'stopping', 'extended']);

export function renderStatusPage(data: StatusPageData): string {
  const failed = data.sources.filter((s) => s.state === 'failed').length;
  const streaming = data.sources.filter((s) => s.state === 'streaming').length;
  const summary = `${data.sources.length} source${data.sources.length === 1 ? '' : 's'}: ${streaming} streaming${failed > 0 ? `, ${failed} failed` : ''}`;
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Philotes: ${escape(summary)}</title>
<noscript><meta http-equiv="refresh" content="${REFRESH_SECONDS * 5}"></noscript>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2329; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  p.meta { color: #5b6670; margin: 0 0 1em; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .35em .7em; border-bottom: 1px solid #dde2e6; vertical-align: top; }
  th { background: #f3f5f7; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  .bad { color: #b3261e; font-weight: 600; }
  .warn { color: #9a6700; }
  .ok { color: #1a7f37; }
  td.error { max-width: 40em; overflow-wrap: anywhere; color: #5b6670; }
</style>
</head>
<body>
<main id="status">
<h1>Philotes — <span id="summary" class="${data.ready ? 'ok' : 'bad'}">${escape(summary)}${data.ready ? '' : ' (not ready)'}</span></h1>
<p class="meta">version ${escape(data.version)} · buffer ${escape(data.buffer.state)}${data.buffer.problem ? `: ${escape(data.buffer.problem)}` : ''} · as of <time datetime="${new Date(data.now).toISOString()}">${new Date(data.now).toISOString()}</time> · <a href="/readyz">/readyz</a> · <a href="/metrics">/metrics</a></p>
<table id="sources">
<thead><tr><th>source</th><th>state</th><th>lag</th><th>retained WAL</th><th>WAL status</th><th>checkpoint age</th><th>events/s</th><th>snapshot</th><th>restarts</th><th>last error</th></tr></thead>
<tbody>
${data.sources.map((s) => row(s, data.now)).join('\n')}
</tbody>
</table>
</main>
<script>
// Fetch the page again and swap the table in: one renderer, on the server.
setInterval(async () => {
  try {
    const res = await fetch(location.pathname, { cache: 'no-store' });
    const next = new DOMParser().parseFromString(await res.text(), 'text/html');
    document.getElementById('status').replaceWith(next.getElementById('status'));
    document.title = next.title;
  } catch {}
}, ${REFRESH_SECONDS * 1000});
</script>
</body>
</html>
`;
}

function row(s: SourceReport, now: number): string {
  const state = `${s.state}${s.state === 'streaming' ? '' : ` for ${duration(s.stateSeconds)}`}${s.nextAttemptAt ? `, next attempt ${relative(s.nextAttemptAt, now)}` : ''}`;
  const lag =
    s.lagBytes === null
      ? '-'
      : `${formatBytes(BigInt(s.lagBytes))}${s.lagSeconds ? ` / ${duration(s.lagSeconds)}` : ''}`;
  const age =
    s.lastStoredAt === null ? '-' : duration(Math.round((now - Date.parse(s.lastStoredAt)) / 1000));
  const error =
    s.lastError === null
      ? ''
      : `${s.lastErrorCode ? `${s.lastErrorCode}: ` : ''}${s.lastError}${s.lastErrorAt ? ` (${relative(s.lastErrorAt, now)})` : ''}${s.lastErrorFix ? ` — fix: ${s.lastErrorFix}` : ''}`;
  const cells = [
    `<td class="source">${escape(s.source)}</td>`,
    `<td class="state ${tone(s.state)}">${escape(state)}</td>`,
    `<td class="lag num">${escape(lag)}</td>`,
    `<td class="retained num">${s.retainedWalBytes === null ? '-' : escape(formatBytes(BigInt(s.retainedWalBytes)))}</td>`,
    `<td class="wal-status ${tone(s.walStatus ?? '')}">${escape(s.walStatus ?? '-')}</td>`,
    `<td class="checkpoint-age num">${escape(age)}</td>`,
    `<td class="events num">${s.eventsPerSecond}</td>`,
    `<td class="snapshot">${escape(snapshotCell(s))}</td>`,
    `<td class="restarts num">${s.restarts}</td>`,
    `<td class="error">${escape(error)}</td>`,
  ];
  return `<tr data-source="${escape(s.source)}" data-state="${escape(s.state)}">${cells.join('')}</tr>`;
}

/** "running: 2 of 5 tables, 120000 rows, now public.orders" or "done: …", or "-". */
function snapshotCell(s: SourceReport): string {
  const snap = s.snapshot;
  if (snap === null) return '-';
  const t = snap.tables;
  const total = t.pending + t.running + t.done + t.skipped_no_key + t.not_published;
  const skipped =
    (t.skipped_no_key > 0 ? `, ${t.skipped_no_key} without a key skipped` : '') +
    (t.not_published > 0 ? `, ${t.not_published} not in the publication` : '');
  const rows = `${snap.rows.toLocaleString('en-US')} rows`;
  return snap.state === 'done'
    ? `#${snap.id} ${snap.reason} done: ${t.done} tables${skipped}, ${rows}`
    : `#${snap.id} ${snap.reason}: ${t.done} of ${total} tables${skipped}, ${rows}${snap.current ? `, now ${snap.current}` : ''}`;
}

function tone(value: string): string {
  return BAD.has(value) ? 'bad' : WARN.has(value) ? 'warn' : value === 'streaming' ? 'ok' : '';
}

function duration(seconds: number): string {
  return humanSeconds(seconds) ?? '-';
}

function relative(iso: string, now: number): string {
  const seconds = Math.round((Date.parse(iso) - now) / 1000);
  return seconds >= 0 ? `in ${duration(seconds)}` : `${duration(-seconds)} ago`;
}

function escape(text: string): string {
  return text.replace(
    /[&<>"']/g,
    (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!,
  );
}
