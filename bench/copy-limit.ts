/**
 * The buffer's physical limit for today's event format (issue 24, "know the limit"): the events
 * Philotes just stored, written out by the buffer in binary COPY format (the format Philotes
 * sends, same columns, same values) and stored again into a fresh, partitioned cdc_events by one
 * `COPY … FROM` that file, with no Philotes in the loop. What Philotes' pipeline reaches against
 * it says how much of the remaining cost is Philotes' and how much is the buffer's per event.
 */
import pg from 'pg';
import { BufferStore } from '../src/buffer/store.js';
import { EVENT_COPY_COLUMNS } from '../src/common/buffer-format.js';
import { createLogger } from '../src/common/logger.js';
import type { Cluster } from '../test/support/cluster.js';
import { connectionOf } from '../test/support/fixture.js';
import { reapedChildCpuSeconds, waitForBackendsGone } from './cluster-cpu.js';

export interface CopyLimit {
  seconds: number;
  rowsPerSecond: number;
  /** The binary COPY file's size. */
  fileBytes: number;
  /** CPU of the buffer's backend that ran the COPY. */
  bufferCpuSeconds: number;
  walBytesPerEvent: number;
}

const COLUMNS = EVENT_COPY_COLUMNS.join(', ');

/** The buffer's WAL position now, as a number of bytes. */
export async function bufferWal(buffer: Cluster, database: string): Promise<bigint> {
  const [row] = await buffer.query<{ n: string }>(
    `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::text AS n`,
    [],
    database,
  );
  return BigInt(row!.n);
}

/**
 * Copies `from`'s events of `table` out to a file and into a new database's cdc_events (made by
 * Philotes' own migrations and partitioning), timing the COPY into it alone.
 */
export async function copyLimit(
  buffer: Cluster,
  from: string,
  table: string,
  rows: number,
): Promise<CopyLimit> {
  // Written and read by the server itself (a superuser's server-side COPY), in its data directory.
  const file = `${buffer.dataDir}/limit-${table}.copy`;
  await buffer.query(
    `COPY (SELECT ${COLUMNS} FROM cdc_events WHERE table_name = '${table}' ORDER BY source_id, lsn, seq)
       TO '${file}' (FORMAT binary)`,
    [],
    from,
  );
  const [size] = await buffer.query<{ n: string }>(
    `SELECT (pg_stat_file($1)).size::text AS n`,
    [file],
    from,
  );
  const db = `limit_${table}`;
  await buffer.createDatabase(db);
  const store = await BufferStore.open(
    connectionOf(buffer, db),
    createLogger('silent'),
    1,
    undefined,
    {
      partitionIntervalMs: 86_400_000,
      partitionsAhead: 3,
    },
  );
  await store.close();
  await buffer.query('CHECKPOINT', [], db);
  await waitForBackendsGone(buffer, db);
  const wal0 = await bufferWal(buffer, db);
  const cpu0 = reapedChildCpuSeconds(buffer);
  const client = new pg.Client({ connectionString: buffer.url(db) });
  await client.connect();
  const started = performance.now();
  const copied = await client.query(`COPY cdc_events (${COLUMNS}) FROM '${file}' (FORMAT binary)`);
  const seconds = (performance.now() - started) / 1000;
  await client.end();
  await waitForBackendsGone(buffer, db);
  const cpu1 = reapedChildCpuSeconds(buffer);
  const wal1 = await bufferWal(buffer, db);
  if (copied.rowCount !== rows)
    throw new Error(`COPY stored ${copied.rowCount} rows, expected ${rows}`);
  return {
    seconds: Math.round(seconds * 1000) / 1000,
    rowsPerSecond: Math.round(rows / seconds),
    fileBytes: Number(size!.n),
    bufferCpuSeconds: Math.round((cpu1 - cpu0) * 100) / 100,
    walBytesPerEvent: Math.round(Number(wal1 - wal0) / rows),
  };
}
