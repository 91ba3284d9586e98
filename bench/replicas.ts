/**
 * Replicas sharing a fleet (docs/operations.md, "Replicas sharing a fleet"), with the default
 * lease settings: 12 sources on one source cluster under a light steady load, N replicas of one
 * configuration.
 *
 * - Hand-over after kill -9: the replica holding the most sources is killed; the time until every
 *   source streams again (its slot active, its lease held by a live replica). Then a replacement
 *   starts and the fleet rebalances. Repeated KILLS times: p50 and max.
 * - Graceful hand-over: the same with SIGTERM (the replica releases its leases as it stops).
 * - Aggregate drain: a backlog on every source drained by 1 replica, then the same backlog (a
 *   second set of slots made before it) by N: wall time to every slot confirmed past it.
 * - Buffer connections each replica holds (pg_stat_activity, application_name philotes:buffer:*).
 *
 *   npm run bench -- fleet --replicas 3
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { startCluster, type Cluster } from '../test/support/cluster.js';
import { PHILOTES_MAIN } from '../test/support/philotes.js';
import { waitFor } from '../test/support/poll.js';
import { pgbench } from './pg-tools.js';

const SOURCES = 12;
const KILLS = 3;
const BACKLOG_TRANSACTIONS = 10_000; // per source, 4 rows each
const DDL = `CREATE TABLE bench_rows (id bigserial PRIMARY KEY, k int, v int, note text, created timestamptz DEFAULT now())`;
const SCRIPT = `\\set g random(1, 1000000)\nINSERT INTO bench_rows (k, v, note) SELECT :g + i, i, 'row ' || i FROM generate_series(1, 4) i;\n`;

export interface ReplicasResult {
  scenario: 'replicas';
  replicas: number;
  sources: number;
  /** Seconds from kill -9 to every source streaming again, one per kill. */
  killSeconds: number[];
  killP50Seconds: number;
  killMaxSeconds: number;
  /** Seconds from SIGTERM to every source streaming again, one per stop. */
  stopSeconds: number[];
  stopMaxSeconds: number;
  /** Backlog drain: one replica against N on the same backlog (rows/s). */
  drain: { rows: number; oneRowsPerSecond: number; manyRowsPerSecond: number; ratio: number };
  /** Buffer connections per replica while streaming. */
  bufferConnectionsPerReplica: number[];
}

interface Replica {
  proc: ChildProcess;
  pid: number;
}

export async function runReplicas(replicas: number): Promise<ReplicasResult> {
  const work = join(tmpdir(), `philotes-bench-${process.pid}-replicas`);
  mkdirSync(work, { recursive: true });
  const [source, buffer] = await Promise.all([
    startCluster({ settings: { max_wal_senders: '60', max_replication_slots: '60' } }),
    startCluster({ settings: { max_connections: '200' } }),
  ]);
  const running = new Set<Replica>();
  const start = (config: string): Replica => {
    const proc = spawn(process.execPath, [PHILOTES_MAIN, '--config', config], {
      env: {
        PATH: process.env['PATH'] ?? '',
        PHILOTES_METRICS_PORT: '0',
        PHILOTES_LOG_LEVEL: process.env['PHILOTES_BENCH_LOG_LEVEL'] ?? 'warn',
      },
      stdio: ['ignore', 'inherit', 'inherit'],
    });
    const r = { proc, pid: proc.pid! };
    running.add(r);
    proc.once('exit', () => running.delete(r));
    return r;
  };
  const stop = async (r: Replica, signal: NodeJS.Signals): Promise<void> => {
    const exited = new Promise((resolve) => r.proc.once('exit', resolve));
    r.proc.kill(signal);
    await exited;
  };
  try {
    const ids = Array.from({ length: SOURCES }, (_, i) => `s${i}`);
    for (const id of ids) {
      await source.createDatabase(id);
      await source.query(DDL, [], id);
    }
    const configFor = (bufferDb: string, slotPrefix: string) => {
      const path = join(work, `${bufferDb}.yaml`);
      writeFileSync(
        path,
        [
          `buffer: { url: "${buffer.url(bufferDb)}" }`,
          'defaults: { snapshot: never }',
          'sources:',
          ...ids.map(
            (id) => `  - { id: ${id}, url: "${source.url(id)}", slot: ${slotPrefix}_${id} }`,
          ),
        ].join('\n'),
      );
      return path;
    };

    // ---- hand-overs under a light load ----
    await buffer.createDatabase('handover');
    const handover = configFor('handover', 'h');
    const fleet: Replica[] = [];
    for (let i = 0; i < replicas; i++) fleet.push(start(handover));
    const fair = Math.ceil(SOURCES / replicas);
    await waitFor(() => streaming(buffer, 'handover', source, 'h', ids, fair), {
      what: 'every source to stream, fairly split',
      timeoutMs: 180_000,
    });
    const load = steadyLoad(source, ids);
    const killSeconds: number[] = [];
    const stopSeconds: number[] = [];
    for (const [signal, times] of [
      ['SIGKILL', killSeconds],
      ['SIGTERM', stopSeconds],
    ] as const) {
      for (let k = 0; k < KILLS; k++) {
        const victim = await busiest(buffer, 'handover', fleet);
        const t0 = performance.now();
        await stop(victim, signal);
        fleet.splice(fleet.indexOf(victim), 1);
        await waitFor(() => streaming(buffer, 'handover', source, 'h', ids, null), {
          what: `every source to stream after ${signal}`,
          timeoutMs: 120_000,
          intervalMs: 50,
        });
        times.push(round((performance.now() - t0) / 1000));
        process.stderr.write(`bench: replicas: ${signal} → all streaming in ${times.at(-1)} s\n`);
        fleet.push(start(handover));
        await waitFor(() => streaming(buffer, 'handover', source, 'h', ids, fair), {
          what: 'the fleet to rebalance',
          timeoutMs: 180_000,
        });
      }
    }
    const connections = await bufferConnections(buffer, 'handover', fleet);
    for (const r of [...fleet]) await stop(r, 'SIGTERM');
    await load.stop();

    // ---- aggregate drain: 1 replica, then N, on the same backlog ----
    for (const prefix of ['one', 'many']) {
      await buffer.createDatabase(`drain_${prefix}`);
      for (const id of ids) {
        await source.query(
          `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`,
          [`${prefix}_${id}`],
          id,
        );
      }
    }
    for (const id of ids)
      await source
        .query('CREATE PUBLICATION philotes_pub FOR ALL TABLES', [], id)
        .catch(() => undefined);
    const script = join(work, 'backlog.sql');
    writeFileSync(script, SCRIPT);
    for (const id of ids)
      await pgbench(
        source,
        ['-n', '-f', script, '-c', '2', '-t', String(BACKLOG_TRANSACTIONS / 2)],
        id,
      );
    const targets = new Map<string, string>();
    for (const id of ids) {
      const [row] = await source.query<{ lsn: string }>(
        'SELECT pg_current_wal_lsn()::text AS lsn',
        [],
        id,
      );
      targets.set(id, row!.lsn);
    }
    const rows = SOURCES * BACKLOG_TRANSACTIONS * 4;
    const drainWith = async (prefix: string, count: number): Promise<number> => {
      const config = configFor(`drain_${prefix}`, prefix);
      const t0 = performance.now();
      const group: Replica[] = [];
      for (let i = 0; i < count; i++) group.push(start(config));
      await waitFor(() => confirmedPast(source, prefix, targets), {
        what: `${count} replica(s) to drain the backlog`,
        timeoutMs: 600_000,
        intervalMs: 100,
      });
      const seconds = (performance.now() - t0) / 1000;
      for (const r of group) await stop(r, 'SIGTERM');
      return Math.round(rows / seconds);
    };
    const oneRowsPerSecond = await drainWith('one', 1);
    const manyRowsPerSecond = await drainWith('many', replicas);
    const sorted = [...killSeconds].sort((a, b) => a - b);
    return {
      scenario: 'replicas',
      replicas,
      sources: SOURCES,
      killSeconds,
      killP50Seconds: sorted[Math.floor(sorted.length / 2)]!,
      killMaxSeconds: Math.max(...killSeconds),
      stopSeconds,
      stopMaxSeconds: Math.max(...stopSeconds),
      drain: {
        rows,
        oneRowsPerSecond,
        manyRowsPerSecond,
        ratio: round(manyRowsPerSecond / oneRowsPerSecond),
      },
      bufferConnectionsPerReplica: connections,
    };
  } finally {
    for (const r of running) r.proc.kill('SIGKILL');
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
    rmSync(work, { recursive: true, force: true });
  }
}

/**
 * Every source streams: its slot active and its lease live; with `fair`, no replica holds more
 * than that many (the fleet has rebalanced).
 */
async function streaming(
  buffer: Cluster,
  bufferDb: string,
  source: Cluster,
  prefix: string,
  ids: readonly string[],
  fair: number | null,
): Promise<boolean> {
  const leases = await buffer
    .query<{ source_id: string; owner: string }>(
      `SELECT l.source_id, l.owner FROM cdc_leases l JOIN cdc_members m ON m.id = l.owner
        WHERE l.expires_at > now() AND m.expires_at > now()`,
      [],
      bufferDb,
    )
    .catch(() => []);
  if (leases.length < ids.length) return false;
  if (fair !== null) {
    const counts = new Map<string, number>();
    for (const l of leases) counts.set(l.owner, (counts.get(l.owner) ?? 0) + 1);
    if ([...counts.values()].some((n) => n > fair)) return false;
  }
  const active = await source.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM pg_replication_slots WHERE slot_name LIKE $1 AND active`,
    [`${prefix}\\_%`],
  );
  return active[0]!.n === ids.length;
}

/** The replica holding the most leases. */
async function busiest(
  buffer: Cluster,
  bufferDb: string,
  fleet: readonly Replica[],
): Promise<Replica> {
  const rows = await buffer.query<{ pid: number; n: number }>(
    `SELECT m.pid, count(*)::int AS n FROM cdc_leases l JOIN cdc_members m ON m.id = l.owner
      WHERE l.expires_at > now() GROUP BY m.pid ORDER BY n DESC`,
    [],
    bufferDb,
  );
  return fleet.find((r) => r.pid === rows[0]?.pid) ?? fleet[0]!;
}

async function bufferConnections(
  buffer: Cluster,
  bufferDb: string,
  fleet: readonly Replica[],
): Promise<number[]> {
  const rows = await buffer.query<{ application_name: string; n: number }>(
    `SELECT application_name, count(*)::int AS n FROM pg_stat_activity
      WHERE datname = $1 AND application_name LIKE 'philotes:buffer:%' GROUP BY 1`,
    [bufferDb],
  );
  const members = await buffer.query<{ id: string; pid: number }>(
    'SELECT id, pid FROM cdc_members WHERE expires_at > now()',
    [],
    bufferDb,
  );
  return fleet.map((r) => {
    const id = members.find((m) => m.pid === r.pid)?.id ?? '';
    const token = id.slice(id.lastIndexOf(':') + 1);
    return rows.find((row) => row.application_name === `philotes:buffer:${token}`)?.n ?? 0;
  });
}

async function confirmedPast(
  source: Cluster,
  prefix: string,
  targets: ReadonlyMap<string, string>,
): Promise<boolean> {
  const client = new pg.Client({ connectionString: source.url('postgres') });
  await client.connect();
  try {
    for (const [id, lsn] of targets) {
      const r = await client.query<{ ok: boolean }>(
        `SELECT confirmed_flush_lsn >= $2::pg_lsn AS ok FROM pg_replication_slots WHERE slot_name = $1`,
        [`${prefix}_${id}`, lsn],
      );
      if (r.rows[0]?.ok !== true) return false;
    }
    return true;
  } finally {
    await client.end();
  }
}

/** One small insert every 50 ms on every source, until stopped. */
function steadyLoad(source: Cluster, ids: readonly string[]): { stop(): Promise<void> } {
  let stopped = false;
  const loops = ids.map(async (id) => {
    const client = new pg.Client({ connectionString: source.url(id) });
    await client.connect();
    try {
      while (!stopped) {
        await client.query(`INSERT INTO bench_rows (k, v, note) VALUES (1, 1, 'steady')`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    } finally {
      await client.end();
    }
  });
  return {
    stop: async () => {
      stopped = true;
      await Promise.all(loops);
    },
  };
}

function round(n: number): number {
  return Math.round(n * 100) / 100;
}
