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
import type { ConsumerLag } from '../buffer/consumer-stats.js';
import type { BufferSize } from '../buffer/partitions.js';

export interface StatusPageData {
  readonly ready: boolean;
  readonly version: string;
  readonly buffer: { readonly state: string; readonly problem?: string | null };
  readonly sources: readonly SourceReport[];
  readonly now: number;
  /** This process in the fleet of replicas on the buffer (null before it has joined). */
  readonly fleet?: FleetReport | null;
  /** The consumer groups' lag and the buffer's size, as the buffer keeper's last round saw them. */
  readonly consumers?: readonly ConsumerLag[];
  readonly events?: BufferSize | null;
}

/** This process among the replicas sharing the buffer's sources. */
export interface FleetReport {
  readonly member: string;
  /** Live capturing members, this one included, as its last lease renewal saw them. */
  readonly members: number;
  /** Sources this process captures (holds the lease of). */
  readonly owned: number;
}

/** A member id (host:pid:token) as people read it: host:pid. */
export function memberName(id: string): string {
  return id.slice(0, id.lastIndexOf(':')) || id;
}

const REFRESH_SECONDS = 2;

/** States and WAL statuses that need a person, and those on the way there. */
const BAD = new Set(['failed', 'lost', 'unreserved']);
const WARN = new Set(['backoff', 'starting', 'stopping', 'extended']);

/** "1 table", "2 tables". */
export function plural(n: number, word: string, many = `${word}s`): string {
  return `${n} ${n === 1 ? word : many}`;
}

/**
 * The headline: the words /readyz answers first ("ready" or "not ready"), then what is true of
 * the sources and the buffer; its colour follows the same verdict (green only when ready and
 * every source streams, amber when ready within the grace period, red when not ready).
 */
export function summarize(data: Pick<StatusPageData, 'ready' | 'buffer' | 'sources'>): {
  readonly text: string;
  readonly tone: 'ok' | 'warn' | 'bad';
} {
  const count = (state: string) => data.sources.filter((s) => s.state === state).length;
  const streaming = count('streaming');
  const others = [
    ['failed', count('failed')],
    ['in backoff', count('backoff')],
    ['starting', count('starting')],
    ['stopping', count('stopping')],
    ['standby', count('standby')],
  ] as const;
  const parts = [
    `${streaming} of ${plural(data.sources.length, 'source')} streaming`,
    ...others.filter(([, n]) => n > 0).map(([what, n]) => `${n} ${what}`),
  ];
  if (data.buffer.state !== 'open') parts.push(`buffer ${data.buffer.state}`);
  const text = `${data.ready ? 'ready' : 'not ready'}: ${parts.join(', ')}`;
  const allWell = streaming === data.sources.length && data.buffer.state === 'open';
  return { text, tone: !data.ready ? 'bad' : allWell ? 'ok' : 'warn' };
}

export function renderStatusPage(data: StatusPageData): string {
  const summary = summarize(data);
  const buffer =
    data.buffer.state === 'open'
      ? 'buffer open'
      : `<span class="${data.buffer.state === 'waiting' ? 'warn' : 'bad'}">buffer ${escape(data.buffer.state)}${data.buffer.problem ? `: ${escape(data.buffer.problem)}` : ''}</span>`;
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Philotes: ${escape(summary.text)}</title>
<noscript><meta http-equiv="refresh" content="${REFRESH_SECONDS * 5}"></noscript>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2329; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.1em; margin: 1.2em 0 .2em; }
  p.meta { color: #5b6670; margin: 0 0 1em; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .35em .7em; border-bottom: 1px solid #dde2e6; vertical-align: top; }
  th { background: #f3f5f7; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  .bad { color: #b3261e; font-weight: 600; }
  .warn { color: #9a6700; }
  .ok { color: #1a7f37; }
  td.error { max-width: 40em; overflow-wrap: anywhere; }
  td.error.past { color: #5b6670; }
  td.error.current { color: #b3261e; }
  td.error summary { cursor: pointer; }
  td.error .whole { white-space: pre-wrap; margin: .3em 0 0; }
</style>
</head>
<body>
<main id="status">
<h1>Philotes — <span id="summary" class="${summary.tone}">${escape(summary.text)}</span></h1>
<p class="meta">version ${escape(data.version)} · <span id="buffer">${buffer}</span>${data.fleet ? ` · <span id="fleet" title="${escape(data.fleet.member)}">${escape(memberName(data.fleet.member))}: ${escape(plural(data.fleet.owned, 'source'))} of ${escape(plural(data.fleet.members, 'replica'))}</span>` : ''} · as of <time datetime="${new Date(data.now).toISOString()}">${new Date(data.now).toISOString()}</time> · <a href="/readyz">/readyz</a> · <a href="/metrics">/metrics</a></p>
<table id="sources">
<thead><tr><th>source</th><th>state</th><th>lag</th><th>retained WAL</th><th>WAL status</th><th>checkpoint age</th><th>events/s</th><th>snapshot</th><th>restarts</th><th>last error</th></tr></thead>
<tbody>
${data.sources.map((s) => row(s, data.now)).join('\n')}
</tbody>
</table>
${consumersSection(data)}
</main>
<script>
// Fetch the page again and swap the table in: one renderer, on the server.
setInterval(async () => {
  try {
    const res = await fetch(location.pathname, { cache: 'no-store' });
    const next = new DOMParser().parseFromString(await res.text(), 'text/html');
    // An error opened to its whole text stays open across the refresh.
    const open = [...document.querySelectorAll('tr[data-source] details[open]')]
      .map((d) => d.closest('tr').dataset.source);
    document.getElementById('status').replaceWith(next.getElementById('status'));
    for (const source of open)
      document.querySelector('tr[data-source="' + CSS.escape(source) + '"] details')?.setAttribute('open', '');
    document.title = next.title;
  } catch {}
}, ${REFRESH_SECONDS * 1000});
</script>
</body>
</html>
`;
}

/** The buffer's size and each consumer group's lag (every replica shows the same). */
function consumersSection(data: StatusPageData): string {
  const events = data.events ?? null;
  const size =
    events === null
      ? ''
      : `<p class="meta" id="events">buffer: cdc_events ${escape(formatBytes(BigInt(events.bytes)))}${events.partitioned ? ` in ${escape(plural(events.partitions, 'partition'))}` : ', <span class="warn">not partitioned yet</span> (philotes-worker partition-buffer)'}</p>`;
  const consumers = data.consumers ?? [];
  if (consumers.length === 0) return `<h2>Consumer groups</h2>${size}<p class="meta">none</p>`;
  const rows = consumers
    .map(
      (c) =>
        `<tr data-group="${escape(c.group)}"><td>${escape(c.group)}</td><td>${escape(c.source)}</td><td>${escape(`${c.lsn}/${c.seq}`)}</td><td class="num">${c.lagEvents}</td><td class="num">${c.lagSeconds === 0 ? 'none' : escape(duration(Math.round(c.lagSeconds)))}</td><td class="${c.expired ? 'bad' : 'ok'}">${c.expired ? 'expired: retention dropped what it had not read' : 'ok'}</td></tr>`,
    )
    .join('\n');
  return `<h2>Consumer groups</h2>${size}
<table id="consumers">
<thead><tr><th>group</th><th>source</th><th>position</th><th>lag (events)</th><th>lag (time)</th><th>state</th></tr></thead>
<tbody>
${rows}
</tbody>
</table>`;
}

function row(s: SourceReport, now: number): string {
  // A failing source passes through starting at each attempt: how long it has not streamed is
  // what a person wants, not how long since the last attempt.
  const state = `${s.state}${s.state === 'streaming' ? '' : ` for ${duration(s.notStreamingSeconds ?? s.stateSeconds)}`}${s.nextAttemptAt ? `, next attempt ${relative(s.nextAttemptAt, now)}` : ''}${s.state === 'standby' && s.owner !== null ? `, captured by ${memberName(s.owner)}` : ''}`;
  const lag =
    s.lagBytes === null
      ? '-'
      : `${formatBytes(BigInt(s.lagBytes))}${s.lagSeconds ? ` / ${duration(s.lagSeconds)}` : ''}`;
  const age =
    s.lastStoredAt === null ? '-' : duration(Math.round((now - Date.parse(s.lastStoredAt)) / 1000));
  const error = errorCell(s, now);
  const cells = [
    `<td class="source">${escape(s.source)}</td>`,
    `<td class="state ${tone(s.state)}">${escape(state)}</td>`,
    `<td class="lag num" title="WAL of this source's database not yet stored, and how long ago the server was where the stored position is">${escape(lag)}</td>`,
    `<td class="retained num">${s.retainedWalBytes === null ? '-' : escape(formatBytes(BigInt(s.retainedWalBytes)))}</td>`,
    `<td class="wal-status ${tone(s.walStatus ?? '')}">${escape(s.walStatus ?? '-')}</td>`,
    `<td class="checkpoint-age num">${escape(age)}</td>`,
    `<td class="events num">${s.eventsPerSecond}</td>`,
    `<td class="snapshot">${escape(snapshotCell(s))}</td>`,
    `<td class="restarts num">${s.restarts}</td>`,
    error,
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
  const rows = plural(snap.rows, 'row').replace(/^\d+/, snap.rows.toLocaleString('en-US'));
  return snap.state === 'done'
    ? `#${snap.id} ${snap.reason} done: ${plural(t.done, 'table')}${skipped}, ${rows}`
    : `#${snap.id} ${snap.reason}: ${t.done} of ${plural(total, 'table')}${skipped}, ${rows}${snap.current ? `, now ${snap.current}` : ''}`;
}

function tone(value: string): string {
  return BAD.has(value) ? 'bad' : WARN.has(value) ? 'warn' : value === 'streaming' ? 'ok' : '';
}

function duration(seconds: number): string {
  return humanSeconds(seconds) ?? '-';
}

function relative(iso: string, now: number): string {
  const seconds = Math.round((Date.parse(iso) - now) / 1000);
  if (seconds === 0) return 'now';
  return seconds > 0 ? `in ${duration(seconds)}` : `${duration(-seconds)} ago`;
}

/** Longer than this, an error shows its first words and opens to the whole text. */
const SHORT_ERROR = 110;

/**
 * The last error, short: its code and first words, when it happened, and the whole text, the
 * fix and the docs one click away (<details>, no script needed). On a streaming source it is
 * history, and says so.
 */
function errorCell(s: SourceReport, now: number): string {
  if (s.lastError === null) return '<td class="error"></td>';
  const past = s.state === 'streaming';
  const when = s.lastErrorAt ? relative(s.lastErrorAt, now) : null;
  const head = `${past ? 'before it streamed again: ' : ''}${s.lastErrorCode ? `${s.lastErrorCode}: ` : ''}`;
  const text = s.lastError;
  const short = text.length > SHORT_ERROR ? `${text.slice(0, SHORT_ERROR).trimEnd()}…` : text;
  // The docs ship with Philotes (README, docs/), not on this port: named, not linked.
  const whole = [
    text.length > SHORT_ERROR ? text : null,
    s.lastErrorFix ? `fix: ${s.lastErrorFix}` : null,
    s.lastErrorDocs ? `docs: ${s.lastErrorDocs}` : null,
  ].filter((x): x is string => x !== null);
  const summary = `${escape(head + short)}${when ? ` <span class="when">(${escape(when)})</span>` : ''}`;
  const body =
    whole.length === 0
      ? summary
      : `<details><summary>${summary}</summary><div class="whole">${escape(whole.join('\n'))}</div></details>`;
  return `<td class="error${past ? ' past' : ' current'}">${body}</td>`;
}

function escape(text: string): string {
  return text.replace(
    /[&<>"']/g,
    (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!,
  );
}
