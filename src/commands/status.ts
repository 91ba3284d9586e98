/**
 * `philotes-worker status`: every configured source now, read from the buffer and the sources,
 * changing nothing (the reading: status/read-status.ts); a table, or --json. Exit 1 when
 * something could not be read or a source has a problem.
 */
import type { Command } from 'commander';
import type { BufferSize, ConsumerLag, MemberRow, SourceStatus } from './status/read-status.js';
import { cliConfig } from './cli.js';
import { EXIT_ERROR, EXIT_OK } from '../common/exit.js';
import { formatTable, humanBytes, humanSeconds } from './output.js';

function slotCell(s: SourceStatus): string | null {
  if (s.slotExists === null) return null;
  if (!s.slotExists) return 'missing';
  const failover = s.slotFailover === true ? ', failover' : '';
  return s.slotActive ? `active: ${s.slotOwner ?? '?'}${failover}` : `inactive${failover}`;
}

/** The replicas on the buffer, one row each (none: no Philotes has run since migration 8). */
export function renderMembers(members: readonly MemberRow[]): string {
  if (members.length === 0) return 'replicas: none registered in the buffer';
  return formatTable(
    ['REPLICA', 'ROLE', 'VERSION', 'STARTED', 'LAST RENEWAL', 'SOURCES'],
    members.map((m) => [
      `${m.host}:${m.pid}`,
      m.role,
      m.version,
      m.startedAt.slice(0, 19),
      m.live
        ? `${humanSeconds(m.heartbeatAgeSeconds)} ago`
        : `gone (${humanSeconds(m.heartbeatAgeSeconds)} ago)`,
      String(m.sources),
    ]),
  );
}

/** The consumer groups' positions and lag, one row per group and source. */
export function renderConsumers(
  consumers: readonly ConsumerLag[],
  events: BufferSize | null,
): string {
  const size =
    events === null
      ? 'buffer: no events table yet'
      : `buffer: cdc_events ${humanBytes(events.bytes)}${events.partitioned ? ` in ${events.partitions} partitions` : ', not partitioned yet (philotes-worker partition-buffer)'}${events.oldestStoredAt === null ? '' : `, oldest event stored ${events.oldestStoredAt.toISOString().slice(0, 19)}`}`;
  if (consumers.length === 0) return `${size}\nconsumer groups: none`;
  return `${size}\n${formatTable(
    ['GROUP', 'SOURCE', 'POSITION', 'COMMITTED', 'LAG EVENTS', 'LAG', 'STATE'],
    consumers.map((c) => [
      c.group,
      c.source,
      `${c.lsn}/${c.seq}`,
      c.committedAt.toISOString().slice(0, 19),
      String(c.lagEvents),
      c.lagSeconds === 0 ? 'none' : humanSeconds(Math.round(c.lagSeconds)),
      c.expired ? 'EXPIRED (retention dropped what it had not read)' : 'ok',
    ]),
  )}`;
}

/** The status table, one row per source. */
export function renderStatus(sources: readonly SourceStatus[]): string {
  return formatTable(
    [
      'SOURCE',
      'CHECKPOINT',
      'STORED',
      'LAG',
      'RETAINED WAL',
      'WAL STATUS',
      'OWNER',
      'SLOT',
      'SNAPSHOT',
      'PROBLEM',
    ],
    sources.map((s) => [
      s.source,
      s.checkpointLsn,
      s.checkpointAgeSeconds === null ? null : `${humanSeconds(s.checkpointAgeSeconds)} ago`,
      humanBytes(s.lagBytes),
      humanBytes(s.retainedWalBytes),
      s.walStatus,
      s.owner,
      slotCell(s),
      s.snapshot === null
        ? null
        : `#${s.snapshot.id} ${s.snapshot.reason} ${s.snapshot.state}, ${s.snapshot.rows} rows`,
      s.problem,
    ]),
  );
}

async function status(opts: { json?: boolean }): Promise<void> {
  const loaded = cliConfig();
  const { readStatus } = await import('./status/read-status.js');
  const report = await readStatus(loaded);
  if (opts.json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  else
    process.stdout.write(
      `${renderStatus(report.sources)}\n\n${renderMembers(report.members)}\n\n${renderConsumers(report.consumers, report.events)}\n`,
    );
  // 1: something could not be read (a source, the buffer); the rows say what.
  process.exit(
    report.buffer !== null || report.sources.some((s) => s.problem) ? EXIT_ERROR : EXIT_OK,
  );
}

export function registerStatus(program: Command): void {
  program
    .command('status')
    .description(
      'every configured source now: its checkpoint and when it was stored, lag, the WAL its slot retains, wal_status, and who holds the slot; read from the buffer and the sources, changing nothing (exit 1 if something could not be read)',
    )
    .option('--json', 'one JSON document instead of a table')
    .action(status);
}
