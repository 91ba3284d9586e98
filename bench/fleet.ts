/**
 * Fleet drain: 16 sources (16 databases on one source cluster) with a backlog each, drained by
 * one Philotes from a configuration file, against one source holding the same total rows, in
 * the same run. Reports aggregate rows/s, the ratio to the single source, peak RSS, and RSS per
 * additional source ((RSS with 16 − RSS with 1) / 15).
 *
 * Then the steady rate: 16 sources × 100 transactions/s, once with coalesced buffer commits (the
 * default) and once without (one source per buffer transaction, as many writers as sources).
 * Reports buffer commits/s, Philotes' CPU, and commit-to-buffer latency (p50/p99).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startCluster, type Cluster } from '../test/support/cluster.js';
import { PHILOTES_MAIN } from '../test/support/philotes.js';
import { commitLatency } from './commit-latency.js';
import { pgbench } from './pg-tools.js';
import { cpuSeconds, peakRssMb } from './proc-stats.js';

export const FLEET_SOURCES = 16;
const TOTAL_TRANSACTIONS = 100_000; // 4 rows each: 400k rows, as the small scenario
const DDL = `CREATE TABLE bench_rows (id bigserial PRIMARY KEY, k int, v int, note text, created timestamptz DEFAULT now())`;
const SCRIPT = `\\set g random(1, 1000000)\nINSERT INTO bench_rows (k, v, note) SELECT :g + i, i, 'row ' || i FROM generate_series(1, 4) i;\n`;

const STEADY_TPS_PER_SOURCE = 100;
const STEADY_SECONDS = 20;

export interface SteadyResult {
  coalesce: boolean;
  commitWriters: number;
  transactions: number;
  /** Transactions committed on the buffer database per second (pg_stat_database). */
  bufferCommitsPerSecond: number;
  /** Philotes' CPU (all threads) per second of wall time. */
  cpuSecondsPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

interface DrainRun {
  /** From start to every checkpoint past its target. */
  seconds: number;
  /** From start to every slot streaming (threads, connections, slot checks). */
  startSeconds: number;
  peakRssMb: number;
  cpuSeconds: DrainCpu;
}

/** CPU seconds of a drain: Philotes (all threads) and the source's walsenders. */
export interface DrainCpu {
  philotes: number;
  walsenders: number;
}

export interface FleetResult {
  scenario: 'fleet';
  sources: number;
  rows: number;
  one: DrainRun & { rowsPerSecond: number };
  fleet: DrainRun & { rowsPerSecond: number };
  /** The same ratio from the moment every slot streams: the drain without the start-up. */
  streamingRatio: number;
  /** Fleet rows/s over one source's rows/s on the same total rows: the goal is ≥ 0.9. */
  ratio: number;
  /** (RSS with 16 − RSS with 1) / 15: the goal is ≤ 25 MB. */
  rssPerSourceMb: number;
  /** 16 sources × 100 tx/s, coalescing on and off: the p99 goal is ≤ 50 ms. */
  steady: SteadyResult[];
}

/** A backlog of `transactions` × 4 rows in `database`, and the position after it. */
async function backlog(
  source: Cluster,
  database: string,
  slot: string,
  transactions: number,
  work: string,
): Promise<string> {
  await source.createDatabase(database);
  await source.query(DDL, [], database);
  await source.query(
    'CREATE TABLE bench_marker (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY)',
    [],
    database,
  );
  await source.query('CREATE PUBLICATION philotes_pub FOR ALL TABLES', [], database);
  await source.query(`SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, [slot], database);
  const script = join(work, 'small.sql');
  writeFileSync(script, SCRIPT);
  const clients = transactions % 4 === 0 ? 4 : 2;
  await pgbench(
    source,
    ['-n', '-c', String(clients), '-j', '2', '-t', String(transactions / clients), '-f', script],
    database,
  );
  // A marker transaction after the backlog: once the checkpoint passes the position taken just
  // before its commit, everything before it is stored.
  const [row] = await source.query<{ lsn: string }>(
    'INSERT INTO bench_marker DEFAULT VALUES RETURNING pg_current_wal_insert_lsn()::text AS lsn',
    [],
    database,
  );
  return row!.lsn;
}

/** Runs Philotes until every source's checkpoint has passed its target; seconds and peak RSS. */
async function drain(
  buffer: Cluster,
  database: string,
  args: string[],
  env: Record<string, string>,
  targets: Map<string, string>,
  source: Cluster,
): Promise<DrainRun> {
  const started = performance.now();
  let streamingAt: number | null = null;
  const child: ChildProcess = spawn(process.execPath, [PHILOTES_MAIN, ...args], {
    env: {
      PATH: process.env['PATH'] ?? '',
      PHILOTES_METRICS_PORT: '0',
      PHILOTES_LOG_LEVEL: 'warn',
      ...env,
    },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  for (;;) {
    if (streamingAt === null) {
      const [active] = await source.query<{ n: number }>(
        'SELECT count(*)::int AS n FROM pg_replication_slots WHERE active AND slot_name = ANY($1)',
        [[...targets.keys()].map((id) => `philotes_${id}`)],
      );
      if (active!.n === targets.size) streamingAt = performance.now();
    }
    const rows = await buffer
      .query<{ source_id: string; lsn: string }>(
        'SELECT source_id, lsn FROM cdc_checkpoints',
        [],
        database,
      )
      .catch(() => []);
    const reached = new Map(rows.map((r) => [r.source_id, r.lsn]));
    const done = await buffer
      .query<{ ok: boolean }>(
        `SELECT bool_and(reached::pg_lsn >= target::pg_lsn) AS ok
           FROM unnest($1::text[], $2::text[]) AS t(target, reached)`,
        [[...targets.values()], [...targets.keys()].map((id) => reached.get(id) ?? '0/0')],
        database,
      )
      .catch(() => []);
    if (done[0]?.ok) break;
    if (child.exitCode !== null) throw new Error(`philotes exited with ${child.exitCode}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const seconds = (performance.now() - started) / 1000;
  const rss = peakRssMb(child.pid!);
  const cpu = {
    philotes: round(cpuSeconds(child.pid!).own),
    walsenders: round(walsenderCpuSeconds()),
  };
  child.kill('SIGTERM');
  if ((await exited) !== 0) throw new Error('philotes did not stop cleanly');
  return {
    seconds,
    startSeconds: ((streamingAt ?? performance.now()) - started) / 1000,
    peakRssMb: rss,
    cpuSeconds: cpu,
  };
}

export async function runFleet(): Promise<FleetResult> {
  const work = join(tmpdir(), `philotes-bench-${process.pid}-fleet`);
  mkdirSync(work, { recursive: true });
  const [source, buffer] = await Promise.all([
    startCluster({ settings: { max_wal_senders: '40', max_replication_slots: '40' } }),
    startCluster({ settings: { max_connections: '200' } }),
  ]);
  try {
    await Promise.all([buffer.createDatabase('buffer'), buffer.createDatabase('buffer_one')]);
    const rows = TOTAL_TRANSACTIONS * 4;
    // One source with every row.
    const oneTarget = await backlog(source, 'one', 'philotes_one', TOTAL_TRANSACTIONS, work);
    // Sixteen with a sixteenth each.
    const targets = new Map<string, string>();
    for (let i = 0; i < FLEET_SOURCES; i++) {
      targets.set(
        `s${i}`,
        await backlog(
          source,
          `src${i}`,
          `philotes_s${i}`,
          TOTAL_TRANSACTIONS / FLEET_SOURCES,
          work,
        ),
      );
    }
    const one = await drain(
      buffer,
      'buffer_one',
      [],
      {
        PHILOTES_CDC_SOURCE_URL: source.url('one'),
        PHILOTES_CDC_SOURCE_ID: 'one',
        PHILOTES_CDC_REPLICATION_SLOT: 'philotes_one',
        PHILOTES_BUFFER_URL: buffer.url('buffer_one'),
        // Drains of the stream: the backlog's rows are in the tables already, and an initial
        // snapshot (the default) would copy them alongside; the fleet's file says the same.
        PHILOTES_CDC_SNAPSHOT: 'never',
      },
      new Map([['one', oneTarget]]),
      source,
    );
    const config = join(work, 'fleet.yaml');
    writeFileSync(
      config,
      [
        `buffer: { url: "${buffer.url('buffer')}" }`,
        'defaults: { snapshot: never }',
        'sources:',
        ...[...targets.keys()].map(
          (id, i) => `  - { id: ${id}, url: "${source.url(`src${i}`)}", slot: philotes_${id} }`,
        ),
      ].join('\n'),
    );
    const fleet = await drain(buffer, 'buffer', ['--config', config], {}, targets, source);
    const steady: SteadyResult[] = [];
    for (const [coalesce, writers] of [
      [true, 2],
      [false, FLEET_SOURCES],
    ] as const) {
      steady.push(await runSteady(source, work, coalesce, writers));
    }
    return {
      scenario: 'fleet',
      sources: FLEET_SOURCES,
      rows,
      one: {
        ...one,
        seconds: round(one.seconds),
        startSeconds: round(one.startSeconds),
        rowsPerSecond: Math.round(rows / one.seconds),
      },
      fleet: {
        ...fleet,
        seconds: round(fleet.seconds),
        startSeconds: round(fleet.startSeconds),
        rowsPerSecond: Math.round(rows / fleet.seconds),
      },
      ratio: round(one.seconds / fleet.seconds),
      streamingRatio: round(
        (one.seconds - one.startSeconds) / (fleet.seconds - fleet.startSeconds),
      ),
      rssPerSourceMb: round((fleet.peakRssMb - one.peakRssMb) / (FLEET_SOURCES - 1)),
      steady,
    };
  } finally {
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
    rmSync(work, { recursive: true, force: true });
  }
}

/**
 * CPU used so far by the walsenders on this machine (each reads and decodes the whole cluster's
 * WAL, whichever database its slot is in): where a drain's time goes besides Philotes.
 */
function walsenderCpuSeconds(): number {
  let total = 0;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      if (cmdline.startsWith('postgres: walsender')) total += cpuSeconds(Number(entry)).own;
    } catch {
      // Gone meanwhile.
    }
  }
  return total;
}

/**
 * 16 sources at a steady rate into a buffer on its own cluster, fsync on (what a commit costs in
 * production) and track_commit_timestamp on: a source transaction's latency is the commit time
 * of the buffer transaction that stored it minus its source commit time (one machine, one clock).
 */
export async function runSteady(
  source: Cluster,
  work: string,
  coalesce: boolean,
  writers: number,
  tag = coalesce ? 'on' : 'off',
): Promise<SteadyResult> {
  const buffer = await startCluster({
    settings: { fsync: 'on', full_page_writes: 'on', track_commit_timestamp: 'on' },
  });
  let child: ChildProcess | null = null;
  try {
    await buffer.createDatabase('buffer');
    const ids = Array.from({ length: FLEET_SOURCES }, (_, i) => `${tag}${i}`);
    for (const id of ids) {
      await source.createDatabase(`steady_${id}`);
      await source.query(DDL, [], `steady_${id}`);
    }
    const config = join(work, `steady-${tag}.yaml`);
    writeFileSync(
      config,
      [
        `buffer: { url: "${buffer.url('buffer')}" }`,
        'defaults: { snapshot: never }',
        `commitCoalesce: ${coalesce}`,
        `commitWriters: ${writers}`,
        'sources:',
        ...ids.map(
          (id) =>
            `  - { id: ${id}, url: "${source.url(`steady_${id}`)}", slot: philotes_steady_${id} }`,
        ),
      ].join('\n'),
    );
    child = spawn(process.execPath, [PHILOTES_MAIN, '--config', config], {
      env: {
        PATH: process.env['PATH'] ?? '',
        PHILOTES_METRICS_PORT: '0',
        PHILOTES_LOG_LEVEL: 'warn',
      },
      stdio: ['ignore', 'inherit', 'inherit'],
    });
    for (;;) {
      const [row] = await source.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM pg_replication_slots WHERE slot_name LIKE 'philotes_steady_${tag}%' AND active`,
      );
      if (row!.n === FLEET_SOURCES) break;
      if (child.exitCode !== null) throw new Error(`philotes exited with ${child.exitCode}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const commits = async () =>
      Number(
        (
          await buffer.query<{ n: string }>(
            `SELECT xact_commit AS n FROM pg_stat_database WHERE datname = 'buffer'`,
          )
        )[0]!.n,
      );
    const script = join(work, 'steady.sql');
    writeFileSync(script, `INSERT INTO bench_rows (k, v, note) VALUES (1, 2, 'steady');\n`);
    const commitsBefore = await commits();
    const cpuBefore = cpuSeconds(child.pid!).own;
    const started = performance.now();
    await Promise.all(
      ids.map((id) =>
        pgbench(
          source,
          [
            '-n',
            '-c',
            '1',
            '-R',
            String(STEADY_TPS_PER_SOURCE),
            '-T',
            String(STEADY_SECONDS),
            '-f',
            script,
          ],
          `steady_${id}`,
        ),
      ),
    );
    const seconds = (performance.now() - started) / 1000;
    const cpu = cpuSeconds(child.pid!).own - cpuBefore;
    // pg_stat_database lags by up to its report interval: read it once it has settled.
    await new Promise((r) => setTimeout(r, 1000));
    const bufferCommits = (await commits()) - commitsBefore;
    let expected = 0;
    for (const id of ids) {
      const [row] = await source.query<{ n: number }>(
        'SELECT count(*)::int AS n FROM bench_rows',
        [],
        `steady_${id}`,
      );
      expected += row!.n;
    }
    for (;;) {
      const [row] = await buffer.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM cdc_events`,
        [],
        'buffer',
      );
      if (row!.n >= expected) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const latency = await commitLatency(buffer, 'buffer', 'bench_rows');
    return {
      coalesce,
      commitWriters: writers,
      transactions: expected,
      bufferCommitsPerSecond: Math.round(bufferCommits / seconds),
      cpuSecondsPerSecond: round(cpu / seconds),
      p50Ms: latency.p50Ms,
      p99Ms: latency.p99Ms,
      maxMs: latency.maxMs,
    };
  } finally {
    if (child && child.exitCode === null) {
      child.kill('SIGTERM');
      await new Promise((r) => child!.once('exit', r));
    }
    await buffer.destroy();
    // The slots would hold the source's WAL for the rest of the run.
    await source.query(
      `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'philotes_steady_${tag}%'`,
    );
  }
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}
