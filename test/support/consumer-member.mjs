// A member of a consumer group as a service runs one, for the fault tests: each batch's events
// become rows of the test's table `applied` (source, lsn, seq, member), written through the
// batch's transaction, so each must land exactly once whatever happens to the members. Plain
// JavaScript run by node, importing Philotes by its package name (dist/, built by npm test).
import process from 'node:process';
import { pino } from 'pino';
import { consume } from 'philotes';

const env = process.env;
const delayMs = Number(env.HANDLER_DELAY_MS ?? '0');
const consumer = await consume({
  buffer: env.BUFFER_URL,
  group: env.GROUP,
  sources: env.SOURCES ? env.SOURCES.split(',') : undefined,
  batchSize: Number(env.BATCH_SIZE ?? '100'),
  pollIntervalMs: 500,
  leaseTtlMs: 3000,
  leaseRenewIntervalMs: 1000,
  rebalanceMinHoldMs: 1000,
  logger: pino({ level: env.LOG_LEVEL ?? 'info' }, pino.destination({ fd: 2, sync: true })),
  handler: async (batch, tx) => {
    const events = batch.records.filter((r) => r.kind === 'event');
    await tx.query(
      `INSERT INTO applied (source, lsn, seq, member)
       SELECT $1, l::pg_lsn, s, $4 FROM unnest($2::text[], $3::int[]) AS x(l, s)`,
      [batch.source, events.map((e) => e.lsn), events.map((e) => e.seq), process.pid],
    );
    // A slow handler: a kill most likely lands in the middle of a batch.
    if (delayMs > 0) await tx.query('SELECT pg_sleep($1)', [delayMs / 1000]);
  },
});
process.stdout.write(`${JSON.stringify({ msg: 'consumer started', pid: process.pid })}\n`);
process.once('SIGTERM', () => void consumer.stop().then(() => process.exit(0)));
