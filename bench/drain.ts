/**
 * Drain benchmark: builds a write backlog on a throwaway source, then measures, in the same run,
 * how fast PostgreSQL's own pg_recvlogical drains a twin slot to a file and how fast Philotes
 * drains its slot durably into the buffer (start to last checkpoint committed).
 *
 *   npm run bench                 # all scenarios but fleet
 *   npm run bench -- small        # one scenario: small | bulk | wide | latency | fleet | huge | large | snapshot
 *   npm run bench -- fleet --replicas 3   # fleet, then N replicas sharing 12 sources (bench/replicas.ts)
 *   npm run bench -- replicas           # only the replicas (3 unless --replicas N)
 *   npm run bench -- consume            # a consumer group member reading the buffer (bench/consume.ts)
 *
 * Prints a table and writes bench-results/drain-<timestamp>.json. Not a test: no assertions.
 * PHILOTES_BENCH_LOG_LEVEL=debug shows Philotes' own log; PHILOTES_BENCH_NODE_FLAGS passes node
 * flags (e.g. '--cpu-prof --cpu-prof-dir=/tmp/prof'); PHILOTES_CDC_* settings pass through.
 */
import type { ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, totalmem, tmpdir } from 'node:os';
import { join } from 'node:path';
import { SCENARIOS, buildBacklog, type Scenario } from './backlog.js';
import { destroyAllClusters, startCluster, type Cluster } from '../test/support/cluster.js';
import { FLEET_SOURCES, runFleet, type FleetResult } from './fleet.js';
import { runReplicas, type ReplicasResult } from './replicas.js';
import { runConsume, type ConsumeResult } from './consume.js';
import { binDir, pgbench, runTool } from './pg-tools.js';
import { commitLatency } from './commit-latency.js';
import { spawnPhilotes } from './philotes-process.js';
import { HUGE_ROWS, runHugeTransaction, type HugeRun } from './huge-transaction.js';
import { runLargeValues, type LargeValueRun } from './large-value.js';
import { runSnapshotBench, SNAPSHOT_ROWS, type SnapshotBench } from './snapshot.js';
import { cpuSeconds } from './proc-stats.js';
import { reapedChildCpuSeconds, waitForBackendsGone } from './cluster-cpu.js';
import { bufferWal, copyLimit, type CopyLimit } from './copy-limit.js';

interface Result {
  scenario: string;
  description: string;
  rows: number;
  transactions: number;
  walBytes: number;
  recvlogical: { seconds: number; rowsPerSecond: number; walsenderCpuSeconds: number };
  philotes: {
    seconds: number;
    rowsPerSecond: number;
    peakRssMb: number;
    cpuSeconds: number;
    cpuSecondsPerMillionRows: number;
    /** CPU of the source's walsender (and setup connection) while Philotes drained. */
    walsenderCpuSeconds: number;
    /** CPU of the buffer's backends storing the events. */
    bufferCpuSeconds: number;
    /** The buffer's WAL per event stored (events, checkpoints, everything of the drain). */
    walBytesPerEvent: number;
  };
  ratio: number;
  /** The same events stored by one COPY from a file: the buffer's limit (copy-limit.ts). */
  limit: CopyLimit;
  /** Philotes' rows/s against the limit's. */
  limitRatio: number;
}

async function timeRecvlogical(source: Cluster, work: string, slot = 'twin'): Promise<number> {
  const [end] = await source.query<{ lsn: string }>(
    'SELECT pg_current_wal_lsn()::text AS lsn',
    [],
    'app',
  );
  const out = join(work, 'recvlogical.out');
  const started = performance.now();
  await runTool(
    join(binDir(), 'pg_recvlogical'),
    [
      '-h',
      source.host,
      '-p',
      String(source.port),
      '-U',
      source.user,
      '-d',
      'app',
      '--slot',
      slot,
      '--start',
      '--no-loop',
      '--endpos',
      end!.lsn,
      '-o',
      'proto_version=1',
      '-o',
      'publication_names=philotes_pub',
      '-f',
      out,
    ],
    { PGPASSWORD: source.password },
  );
  const seconds = (performance.now() - started) / 1000;
  if (statSync(out).size === 0) throw new Error('pg_recvlogical wrote nothing');
  return seconds;
}

function procStats(pid: number): { rssPeakKb: number; cpuSeconds: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const hwm = /VmHWM:\s+(\d+) kB/.exec(status);
  return { rssPeakKb: Number(hwm?.[1] ?? 0), cpuSeconds: cpuSeconds(pid).own };
}

async function timePhilotes(source: Cluster, buffer: Cluster, target: string) {
  const started = performance.now();
  if (process.env['PHILOTES_BENCH_LOG_LEVEL']) {
    process.stderr.write(`bench: starting philotes at ${new Date().toISOString()}\n`);
  }
  const child = spawnPhilotes(source, buffer);
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  let seconds: number;
  for (;;) {
    const rows = await buffer
      .query<{ done: boolean }>(
        `SELECT lsn::pg_lsn > $1::pg_lsn AS done FROM cdc_checkpoints WHERE source_id = 'bench'`,
        [target],
        'buffer',
      )
      .catch(() => []);
    if (rows[0]?.done) {
      seconds = (performance.now() - started) / 1000;
      break;
    }
    if (child.exitCode !== null) throw new Error(`philotes exited with ${child.exitCode}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const stats = procStats(child.pid!);
  child.kill('SIGTERM');
  const code = await exited;
  if (code !== 0) throw new Error(`philotes exited with ${code} after SIGTERM`);
  return { seconds, ...stats };
}

async function runScenario(s: Scenario): Promise<Result> {
  const work = join(tmpdir(), `philotes-bench-${process.pid}-${s.name}`);
  mkdirSync(work, { recursive: true });
  const [source, buffer] = await Promise.all([startCluster(), startCluster()]);
  try {
    await Promise.all([source.createDatabase('app'), buffer.createDatabase('buffer')]);
    await source.query(s.ddl, [], 'app');
    await source.query(
      'CREATE TABLE bench_marker (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY)',
      [],
      'app',
    );
    await source.query('CREATE PUBLICATION philotes_pub FOR ALL TABLES', [], 'app');
    await source.query(
      `SELECT pg_create_logical_replication_slot('philotes_cdc', 'pgoutput')`,
      [],
      'app',
    );
    await source.query(`SELECT pg_create_logical_replication_slot('twin', 'pgoutput')`, [], 'app');
    const { target, walBytes } = await buildBacklog(source, s, work);
    const rows = s.clients * s.transactions * s.rowsPerTransaction;
    const sourceCpu0 = reapedChildCpuSeconds(source);
    const recv = await timeRecvlogical(source, work);
    await waitForBackendsGone(source, 'app');
    const sourceCpu1 = reapedChildCpuSeconds(source);
    const bufferCpu0 = reapedChildCpuSeconds(buffer);
    const bufferWal0 = await bufferWal(buffer, 'postgres');
    const ph = await timePhilotes(source, buffer, target);
    await Promise.all([waitForBackendsGone(source, 'app'), waitForBackendsGone(buffer, 'buffer')]);
    const sourceCpu2 = reapedChildCpuSeconds(source);
    const bufferCpu1 = reapedChildCpuSeconds(buffer);
    const [stored] = await buffer.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM cdc_events WHERE table_name = 'bench_rows'`,
      [],
      'buffer',
    );
    if (stored!.n !== rows) throw new Error(`expected ${rows} events, found ${stored!.n}`);
    const bufferWal1 = await bufferWal(buffer, 'postgres');
    const limit = await copyLimit(buffer, 'buffer', 'bench_rows', rows);
    return {
      scenario: s.name,
      description: s.description,
      rows,
      transactions: s.clients * s.transactions,
      walBytes,
      recvlogical: {
        seconds: round(recv),
        rowsPerSecond: Math.round(rows / recv),
        walsenderCpuSeconds: round(sourceCpu1 - sourceCpu0),
      },
      philotes: {
        seconds: round(ph.seconds),
        rowsPerSecond: Math.round(rows / ph.seconds),
        peakRssMb: Math.round(ph.rssPeakKb / 1024),
        cpuSeconds: round(ph.cpuSeconds),
        cpuSecondsPerMillionRows: round((ph.cpuSeconds / rows) * 1e6),
        walsenderCpuSeconds: round(sourceCpu2 - sourceCpu1),
        bufferCpuSeconds: round(bufferCpu1 - bufferCpu0),
        walBytesPerEvent: Math.round(Number(bufferWal1 - bufferWal0) / rows),
      },
      ratio: round(recv / ph.seconds),
      limit,
      limitRatio: round(limit.seconds / ph.seconds),
    };
  } finally {
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
    rmSync(work, { recursive: true, force: true });
  }
}

interface LatencyResult {
  scenario: 'latency';
  description: string;
  targetTps: number;
  transactions: number;
  p50Ms: number;
  p95Ms: number;
  p99Ms: number;
  maxMs: number;
}

/**
 * Steady load at LATENCY_TPS transactions per second while Philotes streams. Latency per source
 * transaction is the commit time of the buffer transaction that stored it (track_commit_timestamp
 * on the buffer cluster) minus the source commit time: the whole way, until durable in the buffer.
 * Both clusters share this machine's clock.
 */
const LATENCY_TPS = 1000;
const LATENCY_SECONDS = 20;

async function runLatency(): Promise<LatencyResult> {
  const work = join(tmpdir(), `philotes-bench-${process.pid}-latency`);
  mkdirSync(work, { recursive: true });
  const [source, buffer] = await Promise.all([
    startCluster(),
    startCluster({ settings: { track_commit_timestamp: 'on' } }),
  ]);
  let child: ChildProcess | null = null;
  try {
    await Promise.all([source.createDatabase('app'), buffer.createDatabase('buffer')]);
    await source.query(
      `CREATE TABLE bench_rows (id bigserial PRIMARY KEY, k int, v int, note text, created timestamptz DEFAULT now())`,
      [],
      'app',
    );
    child = spawnPhilotes(source, buffer);
    for (;;) {
      const rows = await source.query<{ active: boolean }>(
        'SELECT active FROM pg_replication_slots',
        [],
        'app',
      );
      if (rows[0]?.active) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const scriptFile = join(work, 'latency.sql');
    writeFileSync(scriptFile, `INSERT INTO bench_rows (k, v, note) VALUES (1, 2, 'latency');\n`);
    await pgbench(source, [
      '-n',
      '-c',
      '4',
      '-j',
      '2',
      '-R',
      String(LATENCY_TPS),
      '-T',
      String(LATENCY_SECONDS),
      '-f',
      scriptFile,
    ]);
    const [count] = await source.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM bench_rows',
      [],
      'app',
    );
    for (;;) {
      const [row] = await buffer.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM cdc_events WHERE table_name = 'bench_rows'`,
        [],
        'buffer',
      );
      if (row!.n >= count!.n) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    // The first two seconds warm up (JIT, connections); they are left out.
    const stats = await commitLatency(buffer, 'buffer', 'bench_rows');
    return {
      scenario: 'latency',
      description: `${LATENCY_TPS} single-row transactions/s for ${LATENCY_SECONDS} s from 4 clients`,
      targetTps: LATENCY_TPS,
      ...stats,
    };
  } finally {
    child?.kill('SIGTERM');
    await Promise.allSettled([source.destroy(), buffer.destroy()]);
    rmSync(work, { recursive: true, force: true });
  }
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const replicasAt = argv.indexOf('--replicas');
  const replicas = replicasAt >= 0 ? Number(argv[replicasAt + 1]) : null;
  if (replicas !== null && !(Number.isInteger(replicas) && replicas >= 2))
    throw new Error('--replicas needs a number of replicas, 2 or more');
  const wanted =
    replicasAt >= 0 ? argv.filter((_, i) => i !== replicasAt && i !== replicasAt + 1) : argv;
  const scenarios =
    wanted.length > 0 ? SCENARIOS.filter((s) => wanted.includes(s.name)) : SCENARIOS;
  const latencyWanted = wanted.length === 0 || wanted.includes('latency');
  const fleetWanted = wanted.includes('fleet');
  const replicasWanted = wanted.includes('replicas') || replicas !== null;
  const hugeWanted = wanted.includes('huge');
  const largeWanted = wanted.includes('large');
  const snapshotWanted = wanted.includes('snapshot');
  const consumeWanted = wanted.includes('consume');
  if (
    scenarios.length === 0 &&
    !latencyWanted &&
    !fleetWanted &&
    !replicasWanted &&
    !hugeWanted &&
    !largeWanted &&
    !snapshotWanted &&
    !consumeWanted
  ) {
    throw new Error(
      `unknown scenario; choose from ${[...SCENARIOS.map((s) => s.name), 'latency', 'fleet', 'replicas', 'huge', 'large', 'snapshot', 'consume'].join(', ')}`,
    );
  }
  const results: Result[] = [];
  for (const s of scenarios) {
    process.stderr.write(`bench: ${s.name}: ${s.description}\n`);
    const r = await runScenario(s);
    results.push(r);
    process.stderr.write(
      `bench: ${s.name}: pg_recvlogical ${r.recvlogical.rowsPerSecond} rows/s, philotes ${r.philotes.rowsPerSecond} rows/s (ratio ${r.ratio}), peak RSS ${r.philotes.peakRssMb} MB, ${r.philotes.cpuSecondsPerMillionRows} CPU s per million rows\n` +
        `bench: ${s.name}: CPU seconds: walsender ${r.recvlogical.walsenderCpuSeconds} for pg_recvlogical; for Philotes: walsender ${r.philotes.walsenderCpuSeconds}, buffer backends ${r.philotes.bufferCpuSeconds}, philotes ${r.philotes.cpuSeconds}\n` +
        `bench: ${s.name}: the buffer's limit, the same events by one COPY from a file (${Math.round(r.limit.fileBytes / 2 ** 20)} MB): ${r.limit.rowsPerSecond} rows/s, buffer backend ${r.limit.bufferCpuSeconds} CPU s, ${r.limit.walBytesPerEvent} WAL bytes per event (Philotes' drain: ${r.philotes.walBytesPerEvent}); Philotes against it ${r.limitRatio}\n`,
    );
  }
  const machine = {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    memoryGb: Math.round(totalmem() / 2 ** 30),
    node: process.version,
  };
  if (results.length > 0)
    console.table(
      results.map((r) => ({
        scenario: r.scenario,
        rows: r.rows,
        'recvlogical rows/s': r.recvlogical.rowsPerSecond,
        'philotes rows/s': r.philotes.rowsPerSecond,
        ratio: r.ratio,
        'COPY limit rows/s': r.limit.rowsPerSecond,
        'vs limit': r.limitRatio,
        'peak RSS MB': r.philotes.peakRssMb,
        'CPU s / M rows': r.philotes.cpuSecondsPerMillionRows,
      })),
    );
  let latency: LatencyResult | null = null;
  if (latencyWanted) {
    process.stderr.write(
      `bench: latency: ${LATENCY_TPS} transactions/s for ${LATENCY_SECONDS} s\n`,
    );
    latency = await runLatency();
    process.stderr.write(
      `bench: latency: p50 ${latency.p50Ms} ms, p95 ${latency.p95Ms} ms, p99 ${latency.p99Ms} ms, max ${latency.maxMs} ms over ${latency.transactions} transactions\n`,
    );
  }
  let fleet: FleetResult | null = null;
  if (fleetWanted) {
    process.stderr.write(
      `bench: fleet: ${FLEET_SOURCES} sources with a backlog each, against one source with the same total rows\n`,
    );
    fleet = await runFleet();
    process.stderr.write(
      `bench: fleet: one source ${fleet.one.rowsPerSecond} rows/s (peak RSS ${fleet.one.peakRssMb} MB), ${fleet.sources} sources ${fleet.fleet.rowsPerSecond} rows/s (peak RSS ${fleet.fleet.peakRssMb} MB): ratio ${fleet.ratio} (${fleet.streamingRatio} from the moment all stream; start-up ${fleet.one.startSeconds} s / ${fleet.fleet.startSeconds} s), RSS per additional source ${fleet.rssPerSourceMb} MB; CPU s (Philotes / walsenders): one ${fleet.one.cpuSeconds.philotes} / ${fleet.one.cpuSeconds.walsenders}, fleet ${fleet.fleet.cpuSeconds.philotes} / ${fleet.fleet.cpuSeconds.walsenders}\n`,
    );
    for (const st of fleet.steady) {
      process.stdout.write(
        `bench: fleet steady ${fleet.sources} × 100 tx/s, coalescing ${st.coalesce ? 'on' : 'off'} (${st.commitWriters} writers): ${st.bufferCommitsPerSecond} buffer commits/s, CPU ${st.cpuSecondsPerSecond} s/s, latency p50 ${st.p50Ms} ms, p99 ${st.p99Ms} ms, max ${st.maxMs} ms over ${st.transactions} transactions\n`,
      );
    }
  }
  let replicaRun: ReplicasResult | null = null;
  if (replicasWanted) {
    process.stderr.write(`bench: replicas: ${replicas ?? 3} replicas sharing 12 sources\n`);
    replicaRun = await runReplicas(replicas ?? 3);
    const r = replicaRun;
    process.stdout.write(
      `bench: replicas ${r.replicas}: kill -9 to all streaming p50 ${r.killP50Seconds} s, max ${r.killMaxSeconds} s (${r.killSeconds.join(', ')}); SIGTERM max ${r.stopMaxSeconds} s (${r.stopSeconds.join(', ')}); drain ${r.drain.rows} rows: 1 replica ${r.drain.oneRowsPerSecond} rows/s, ${r.replicas} replicas ${r.drain.manyRowsPerSecond} rows/s (${r.drain.ratio} ×); buffer connections per replica ${r.bufferConnectionsPerReplica.join(', ')}\n`,
    );
  }
  let huge: HugeRun[] | null = null;
  if (hugeWanted) {
    process.stderr.write(
      `bench: huge: one transaction of ${HUGE_ROWS} rows, protocol 2 (streamed) then 1 (spilled by the source)\n`,
    );
    huge = await runHugeTransaction();
    for (const h of huge) {
      process.stdout.write(
        `bench: huge, protocol ${h.protocol}: ${h.rows} rows stored ${h.afterCommitSeconds} s after the source's COMMIT (${h.totalSeconds} s from the first INSERT), Philotes peak RSS ${h.peakRssMb} MB, CPU ${h.cpuSeconds} s; source slot: spilled ${h.slot.spillTxns} tx / ${Math.round(h.slot.spillBytes / 2 ** 20)} MB, streamed ${h.slot.streamTxns} tx / ${Math.round(h.slot.streamBytes / 2 ** 20)} MB\n`,
      );
    }
  }
  let large: LargeValueRun[] | null = null;
  if (largeWanted) {
    process.stderr.write('bench: large: single large values, peak RSS rise per value byte\n');
    large = await runLargeValues();
    for (const l of large) {
      process.stdout.write(
        `bench: large ${l.kind} value of ${l.valueMb} MB: RSS ${l.rssBeforeMb} MB before, peak ${l.peakRssMb} MB: ${l.costPerValueByte} × the value\n`,
      );
    }
  }
  let snapshot: SnapshotBench | null = null;
  if (snapshotWanted) {
    process.stderr.write(
      `bench: snapshot: the initial snapshot of a ${SNAPSHOT_ROWS}-row table against pg_dump --data-only | psql\n`,
    );
    snapshot = await runSnapshotBench();
    const s = snapshot;
    process.stdout.write(
      `bench: snapshot: Philotes ${s.philotesRowsPerSecond} rows/s (${s.philotesSeconds} s, ${s.chunks} chunks, peak RSS ${s.philotesPeakRssMb} MB, CPU ${s.philotesCpuSeconds} s); pg_dump | psql ${s.pgDumpRowsPerSecond} rows/s (${s.pgDumpSeconds} s); ratio ${s.ratio}; CPU s of the source's backends ${s.sourceBackendCpuSeconds}, of the buffer's ${s.bufferBackendCpuSeconds}\n`,
    );
  }
  let consumed: ConsumeResult | null = null;
  if (consumeWanted) {
    process.stderr.write('bench: consume: one member of a consumer group reading the buffer\n');
    consumed = await runConsume();
    const c = consumed;
    process.stdout.write(
      `bench: consume: read and committed ${c.readEventsPerSecond} events/s (a ${c.backlogEvents}-event backlog); wake-up (idle, source COMMIT to handler) p50 ${c.wakeupP50Ms} ms, p99 ${c.wakeupP99Ms} ms; end to end at 1k tx/s (${c.e2eTransactions} tx) p50 ${c.e2eP50Ms} ms, p99 ${c.e2eP99Ms} ms\n`,
    );
    const k = c.capture.rowsPerSecond;
    process.stdout.write(
      `bench: consume: the capture draining ${c.capture.rows} rows, rows/s per round: wake-ups off ${k.off.join(', ')}; on ${k.on.join(', ')}; on, with a member reading along and the retention keeper running (${c.capture.partitionsDropped} partitions dropped) ${k.consumed.join(', ')}; medians: on/off ${c.capture.onVsOff}, consumed/off ${c.capture.consumedVsOff}\n`,
    );
  }
  mkdirSync('bench-results', { recursive: true });
  const file = join(
    'bench-results',
    `drain-${new Date().toISOString().replace(/[:.]/g, '-')}.json`,
  );
  writeFileSync(
    file,
    JSON.stringify(
      {
        machine,
        results,
        latency,
        fleet,
        replicas: replicaRun,
        huge,
        large,
        snapshot,
        consume: consumed,
      },
      null,
      2,
    ),
  );
  process.stderr.write(`bench: wrote ${file}\n`);
}

main()
  .catch((error: unknown) => {
    process.stderr.write(`bench failed: ${error instanceof Error ? error.stack : String(error)}\n`);
    process.exitCode = 1;
  })
  .finally(() => destroyAllClusters());
