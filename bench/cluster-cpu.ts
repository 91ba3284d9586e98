/** CPU time spent by a test cluster's backends, for the benches' accounts of where time goes. */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Cluster } from '../test/support/cluster.js';
import { cpuSeconds } from './proc-stats.js';

/**
 * CPU seconds of a cluster's exited backends: the postmaster reaps them, so their time lands in
 * its cutime/cstime. Read before and after a phase, the difference is what the walsender (source)
 * or the COPY backends (buffer) spent on it, once their connections have ended.
 */
export function reapedChildCpuSeconds(cluster: Cluster): number {
  const pid = Number(readFileSync(join(cluster.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
  return cpuSeconds(pid).children;
}

/** Waits until no other backend is connected to `database` (so its CPU has been reaped). */
export async function waitForBackendsGone(cluster: Cluster, database: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const [row] = await cluster.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pg_stat_activity
        WHERE pid <> pg_backend_pid() AND (datname = $1 OR backend_type = 'walsender')`,
      [database],
      database,
    );
    if (row!.n === 0) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`backends on ${database} did not exit`);
}
