/**
 * One huge transaction (5M rows by default) written while Philotes streams, with pgoutput
 * protocol 2 (the source streams it while in progress) and protocol 1 (the source spills it to
 * its own disk until the commit), same run. Reports Philotes' peak RSS, the source's spill and
 * stream counters for the slot, and how long after the source's COMMIT the transaction is stored.
 *
 *   npm run bench -- huge        # PHILOTES_BENCH_HUGE_ROWS=1000000 for a shorter run
 */
import { startCluster } from '../test/support/cluster.js';
import { connect } from '../test/support/fixture.js';
import { waitFor } from '../test/support/poll.js';
import { spawnPhilotes } from './philotes-process.js';
import { cpuSeconds, peakRssMb } from './proc-stats.js';

export interface HugeRun {
  protocol: 1 | 2;
  rows: number;
  /** From the source's COMMIT to the transaction's checkpoint stored in the buffer. */
  afterCommitSeconds: number;
  /** From the first INSERT to the checkpoint stored. */
  totalSeconds: number;
  peakRssMb: number;
  cpuSeconds: number;
  slot: { spillTxns: number; spillBytes: number; streamTxns: number; streamBytes: number };
}

export const HUGE_ROWS = Number(process.env['PHILOTES_BENCH_HUGE_ROWS'] ?? 5_000_000);
/** Rows per INSERT statement of the transaction: the source works on it for a while. */
const CHUNK = 500_000;

async function runOnce(protocol: 1 | 2): Promise<HugeRun> {
  const [source, buffer] = await Promise.all([startCluster(), startCluster()]);
  try {
    await Promise.all([source.createDatabase('app'), buffer.createDatabase('buffer')]);
    await source.query(
      'CREATE TABLE huge (id bigint PRIMARY KEY, k int, note text, at timestamptz DEFAULT now())',
      [],
      'app',
    );
    const child = spawnPhilotes(source, buffer, { PHILOTES_CDC_PROTOCOL: String(protocol) });
    try {
      await waitFor(
        async () => {
          const [row] = await source.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM pg_replication_slots WHERE active`,
            [],
            'app',
          );
          return row!.n > 0;
        },
        { what: 'the slot to stream', timeoutMs: 60_000, intervalMs: 50 },
      );
      const started = performance.now();
      const client = await connect(source, 'app');
      await client.query('BEGIN');
      for (let from = 1; from <= HUGE_ROWS; from += CHUNK) {
        await client.query(
          `INSERT INTO huge (id, k, note) SELECT g, g % 1000, 'row ' || g FROM generate_series($1::bigint, $2::bigint) g`,
          [from, Math.min(HUGE_ROWS, from + CHUNK - 1)],
        );
      }
      await client.query('COMMIT');
      const committed = performance.now();
      const [end] = (
        await client.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn')
      ).rows;
      await client.end();
      await waitFor(
        async () => {
          const rows = await buffer
            .query<{ done: boolean }>(
              `SELECT lsn::pg_lsn >= $1::pg_lsn AS done FROM cdc_checkpoints WHERE source_id = 'bench'`,
              [end!.lsn],
              'buffer',
            )
            .catch(() => []);
          return rows[0]?.done === true;
        },
        { what: 'the transaction to be stored', timeoutMs: 1_800_000, intervalMs: 50 },
      );
      const done = performance.now();
      const peak = peakRssMb(child.pid!);
      const cpu = cpuSeconds(child.pid!).own;
      const [stored] = await buffer.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM cdc_events WHERE table_name = 'huge'`,
        [],
        'buffer',
      );
      if (stored!.n !== HUGE_ROWS)
        throw new Error(`expected ${HUGE_ROWS} events, found ${stored!.n}`);
      const [slot] = await source.query<Record<string, string>>(
        `SELECT spill_txns, spill_bytes, stream_txns, stream_bytes FROM pg_stat_replication_slots`,
        [],
        'app',
      );
      return {
        protocol,
        rows: HUGE_ROWS,
        afterCommitSeconds: round((done - committed) / 1000),
        totalSeconds: round((done - started) / 1000),
        peakRssMb: peak,
        cpuSeconds: round(cpu),
        slot: {
          spillTxns: Number(slot!['spill_txns']),
          spillBytes: Number(slot!['spill_bytes']),
          streamTxns: Number(slot!['stream_txns']),
          streamBytes: Number(slot!['stream_bytes']),
        },
      };
    } finally {
      child.kill('SIGKILL');
    }
  } finally {
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
  }
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}

export async function runHugeTransaction(): Promise<HugeRun[]> {
  return [await runOnce(2), await runOnce(1)];
}
