/**
 * What one large value costs Philotes in memory: a 50 MB and a 200 MB text value and a 20 MB
 * bytea (40 MB as the hex text pgoutput sends), each in its own row, captured by a running
 * Philotes. The cost is the rise of its peak RSS (VmHWM, reset just before the INSERT through
 * /proc/PID/clear_refs) over its RSS at that moment, as a multiple of the value's size.
 *
 *   npm run bench -- large
 */
import { writeFileSync } from 'node:fs';
import { startCluster } from '../test/support/cluster.js';
import { waitFor } from '../test/support/poll.js';
import { spawnPhilotes } from './philotes-process.js';
import { memoryMb } from './proc-stats.js';

const until = (what: string, check: () => Promise<boolean>) =>
  waitFor(check, { what, timeoutMs: 300_000, intervalMs: 50 });

export interface LargeValueRun {
  kind: 'text' | 'bytea';
  valueMb: number;
  rssBeforeMb: number;
  peakRssMb: number;
  /** (peak − before) / value size. */
  costPerValueByte: number;
}

const CASES: ReadonlyArray<{ kind: 'text' | 'bytea'; mb: number }> = [
  { kind: 'text', mb: 50 },
  { kind: 'bytea', mb: 20 },
  { kind: 'text', mb: 200 },
];

export async function runLargeValues(): Promise<LargeValueRun[]> {
  const [source, buffer] = await Promise.all([startCluster(), startCluster()]);
  const child = await (async () => {
    await Promise.all([source.createDatabase('app'), buffer.createDatabase('buffer')]);
    await source.query('CREATE TABLE large (id int PRIMARY KEY, t text, b bytea)', [], 'app');
    return spawnPhilotes(source, buffer);
  })();
  const stored = (id: number) =>
    until(`row ${id} stored`, async () => {
      const rows = await buffer
        .query<{ n: number }>(
          `SELECT count(*)::int AS n FROM cdc_events WHERE (after->>'id')::int = $1`,
          [id],
          'buffer',
        )
        .catch(() => [{ n: 0 }]);
      return rows[0]!.n === 1;
    });
  try {
    await until('the slot to stream', async () => {
      const [row] = await source.query<{ n: number }>(
        'SELECT count(*)::int AS n FROM pg_replication_slots WHERE active',
        [],
        'app',
      );
      return row!.n > 0;
    });
    // Warm: every module loaded, every path taken once.
    for (let id = 1; id <= 20; id++)
      await source.query(`INSERT INTO large VALUES ($1, 'warm', '\\x00')`, [id], 'app');
    await stored(20);
    await new Promise((r) => setTimeout(r, 1000));
    const runs: LargeValueRun[] = [];
    let id = 100;
    for (const c of CASES) {
      id++;
      writeFileSync(`/proc/${child.pid}/clear_refs`, '5'); // resets VmHWM to the current RSS
      const before = memoryMb(child.pid!);
      await source.query(
        c.kind === 'text'
          ? `INSERT INTO large (id, t) SELECT $1, repeat('x', $2 * 1024 * 1024)`
          : `INSERT INTO large (id, b) SELECT $1, decode(repeat('ab', $2 * 1024 * 1024), 'hex')`,
        [id, c.mb],
        'app',
      );
      await stored(id);
      const after = memoryMb(child.pid!);
      runs.push({
        kind: c.kind,
        valueMb: c.mb,
        rssBeforeMb: Math.round(before.rss),
        peakRssMb: Math.round(after.peak),
        costPerValueByte: Math.round(((after.peak - before.rss) / c.mb) * 100) / 100,
      });
      // Let the collector return what the value used before the next one.
      await new Promise((r) => setTimeout(r, 2000));
    }
    return runs;
  } finally {
    child.kill('SIGKILL');
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
  }
}
