/**
 * What one large value costs Philotes in memory: a 50 MB and a 200 MB text value and a 20 MB
 * bytea (40 MB as the hex text pgoutput sends), each in its own row, captured by a running
 * Philotes. The cost is the rise of its peak RSS (VmHWM, reset just before the INSERT through
 * /proc/PID/clear_refs) over its RSS at that moment, as a multiple of the value's size.
 *
 *   npm run bench -- large
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { startCluster } from '../test/support/cluster.js';
import { spawnPhilotes } from './philotes-process.js';

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

function memory(pid: number): { rssMb: number; hwmMb: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (key: string) => Number(new RegExp(`${key}:\\s+(\\d+) kB`).exec(status)?.[1] ?? 0);
  return { rssMb: kb('VmRSS') / 1024, hwmMb: kb('VmHWM') / 1024 };
}

async function until(check: () => Promise<boolean>, timeoutMs = 300_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function runLargeValues(): Promise<LargeValueRun[]> {
  const [source, buffer] = await Promise.all([startCluster(), startCluster()]);
  const child = await (async () => {
    await Promise.all([source.createDatabase('app'), buffer.createDatabase('buffer')]);
    await source.query('CREATE TABLE large (id int PRIMARY KEY, t text, b bytea)', [], 'app');
    return spawnPhilotes(source, buffer);
  })();
  const stored = (id: number) =>
    until(async () => {
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
    await until(async () => {
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
      const before = memory(child.pid!);
      await source.query(
        c.kind === 'text'
          ? `INSERT INTO large (id, t) SELECT $1, repeat('x', $2 * 1024 * 1024)`
          : `INSERT INTO large (id, b) SELECT $1, decode(repeat('ab', $2 * 1024 * 1024), 'hex')`,
        [id, c.mb],
        'app',
      );
      await stored(id);
      const after = memory(child.pid!);
      runs.push({
        kind: c.kind,
        valueMb: c.mb,
        rssBeforeMb: Math.round(before.rssMb),
        peakRssMb: Math.round(after.hwmMb),
        costPerValueByte: Math.round(((after.hwmMb - before.rssMb) / c.mb) * 100) / 100,
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
