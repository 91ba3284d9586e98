/**
 * A fleet under load from a configuration file: 8 sources on two source servers, one buffer.
 * Philotes is killed (SIGKILL) twice mid-load and started again; then one source's walsender is
 * terminated and the other server restarts (fast) while the load goes on. Every source's buffer
 * contents must replay to exactly its source table: nothing lost, nothing twice, in order.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/cluster.js';
import {
  assertReplayMatchesSource,
  checkItemHistories,
  ITEMS_DDL,
  readEvents,
  startLoad,
  waitForSlotActive,
} from '../support/fixture.js';
import { outputTail, waitForExit } from '../support/faults.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const PER_SERVER = 4;

interface Member {
  id: string;
  cluster: Cluster;
  database: string;
  slot: string;
}

describe('a fleet of 8 sources under load', () => {
  let a: Cluster;
  let b: Cluster;
  let buffer: Cluster;
  let dir: string;
  let config: string;
  let philotes: PhilotesProcess | undefined;
  const members: Member[] = [];
  let loads: Array<ReturnType<typeof startLoad>> = [];

  beforeAll(async () => {
    [a, b, buffer] = await Promise.all([startCluster(), startCluster(), startCluster()]);
    await buffer.createDatabase('buffer');
    for (const [name, cluster] of [
      ['a', a],
      ['b', b],
    ] as const) {
      for (let i = 0; i < PER_SERVER; i++) {
        const database = `db_${name}${i}`;
        await cluster.createDatabase(database);
        await cluster.query(ITEMS_DDL, [], database);
        members.push({ id: `${name}${i}`, cluster, database, slot: `philotes_${name}${i}` });
      }
    }
    dir = mkdtempSync(join(tmpdir(), 'philotes-fleet-'));
    config = join(dir, 'fleet.yaml');
    writeFileSync(
      config,
      [
        `buffer: { host: ${buffer.host}, port: ${buffer.port}, database: buffer, user: ${buffer.user}, passwordEnv: BUFFER_PASSWORD }`,
        'defaults: { snapshot: never, checkpointInterval: 1s, batchMaxRows: 50 }',
        'restartMinDelay: 100ms',
        'restartMaxDelay: 2s',
        'sources:',
        ...members.map(
          (m) =>
            `  - { id: ${m.id}, host: ${m.cluster.host}, port: ${m.cluster.port}, database: ${m.database}, user: ${m.cluster.user}, passwordEnv: ${m.cluster === a ? 'A_PASSWORD' : 'B_PASSWORD'}, slot: ${m.slot} }`,
        ),
      ].join('\n'),
    );
  });

  afterAll(async () => {
    await Promise.all(loads.map((l) => l.stop()));
    await philotes?.kill9();
    await Promise.allSettled([a?.destroy(), b?.destroy(), buffer?.destroy()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  function start(): PhilotesProcess {
    philotes = startPhilotes(
      {
        BUFFER_PASSWORD: buffer.password,
        A_PASSWORD: a.password,
        B_PASSWORD: b.password,
        PHILOTES_METRICS_PORT: '0',
      },
      { args: ['--config', config] },
    );
    return philotes;
  }

  async function stored(): Promise<Map<string, number>> {
    const rows = await buffer.query<{ source_id: string; n: number }>(
      'SELECT source_id, count(*)::int AS n FROM cdc_events GROUP BY 1',
      [],
      'buffer',
    );
    return new Map(rows.map((r) => [r.source_id, r.n]));
  }

  /** Waits until every source has stored at least `more` events beyond `from`. */
  async function everySourceGrows(from: Map<string, number>, more: number): Promise<void> {
    await waitFor(
      async () => {
        const now = await stored();
        return members.every((m) => (now.get(m.id) ?? 0) >= (from.get(m.id) ?? 0) + more);
      },
      { what: `every source to store ${more} more events`, timeoutMs: 90_000, intervalMs: 250 },
    );
  }

  it('loses and repeats nothing across kill -9, a terminated walsender and a server restart', async () => {
    start();
    for (const m of members) await waitForSlotActive(m.cluster, m.slot);
    loads = members.map((m) => startLoad(m.cluster, { clients: 1, database: m.database }));
    await everySourceGrows(new Map(), 30);

    for (let kill = 0; kill < 2; kill++) {
      await philotes!.kill9();
      const before = await stored();
      start();
      await everySourceGrows(before, 30);
    }

    // One walsender terminated, and the other server restarted (a planned, fast shutdown).
    const [victim] = await a.query<{ pid: number }>(
      'SELECT active_pid AS pid FROM pg_replication_slots WHERE slot_name = $1',
      [members[0]!.slot],
    );
    await a.query('SELECT pg_terminate_backend($1)', [victim!.pid]);
    await b.restart('fast');
    await everySourceGrows(await stored(), 30);
    expect(philotes!.proc.exitCode, outputTail(philotes!)).toBeNull();

    const stats = await Promise.all(loads.map((l) => l.stop()));
    loads = [];
    expect(stats.every((s) => s.committedTransactions > 0)).toBe(true);
    // Caught up: every slot has confirmed its server's WAL position as of now.
    await everySlotCaughtUp();
    for (const m of members) {
      const rows = checkItemHistories(await readEvents(buffer, m.id));
      await assertReplayMatchesSource(m.cluster, rows, m.database);
      const [count] = await m.cluster.query<{ n: number }>(
        'SELECT count(*)::int AS n FROM items',
        [],
        m.database,
      );
      expect(rows.size, m.id).toBe(count!.n);
    }
    expect(philotes!.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(philotes!, 30_000)).toEqual({ code: 0, signal: null });
  });

  it('a buffer down for a while under load: every source waits, memory stays bounded, all resume and lose nothing', async () => {
    start();
    for (const m of members) await waitForSlotActive(m.cluster, m.slot);
    loads = members.map((m) => startLoad(m.cluster, { clients: 1, database: m.database }));
    await everySourceGrows(await stored(), 20);

    await buffer.stop('fast');
    // Down until every reader has failed to store at least twice (backoff rounds, not a timer).
    const rss: number[] = [];
    await waitFor(
      async () => {
        rss.push(residentMb(philotes!.pid));
        const failures = philotes!
          .logs()
          .filter((l) => typeof l['source'] === 'string' && typeof l['retryInMs'] === 'number');
        return members.every((m) => failures.filter((l) => l['source'] === m.id).length >= 2);
      },
      {
        what: 'every source to retry against the stopped buffer',
        timeoutMs: 60_000,
        intervalMs: 200,
      },
    );
    await buffer.start();
    await everySourceGrows(await stored(), 20);
    expect(philotes!.proc.exitCode, outputTail(philotes!)).toBeNull();
    // Nothing queues up without bound while the buffer is away: readers stop reading.
    console.log(
      `fleet: 8 sources, peak RSS ${Math.round(Math.max(...rss))} MB while the buffer was down`,
    );
    expect(Math.max(...rss)).toBeLessThan(600);

    const stats = await Promise.all(loads.map((l) => l.stop()));
    loads = [];
    expect(stats.every((st) => st.committedTransactions > 0)).toBe(true);
    await everySlotCaughtUp();
    for (const m of members) {
      const rows = checkItemHistories(await readEvents(buffer, m.id));
      await assertReplayMatchesSource(m.cluster, rows, m.database);
    }
    expect(philotes!.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(philotes!, 30_000)).toEqual({ code: 0, signal: null });
  });

  /** Waits until every slot on both servers has confirmed the WAL written so far. */
  async function everySlotCaughtUp(): Promise<void> {
    for (const cluster of [a, b]) {
      const [{ lsn }] = (await cluster.query<{ lsn: string }>(
        'SELECT pg_current_wal_lsn()::text AS lsn',
      )) as [{ lsn: string }];
      await waitFor(
        async () => {
          const rows = await cluster.query<{ ok: boolean }>(
            `SELECT bool_and(confirmed_flush_lsn >= $1::pg_lsn) AS ok FROM pg_replication_slots`,
            [lsn],
          );
          return rows[0]?.ok === true;
        },
        { what: 'every slot to confirm the WAL written under load', timeoutMs: 120_000 },
      );
    }
  }
});

/** A process's resident memory in MB (Linux). */
function residentMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = /^VmRSS:\s+(\d+) kB$/m.exec(status)?.[1];
  return kb === undefined ? 0 : Number(kb) / 1024;
}
