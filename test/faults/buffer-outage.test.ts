/**
 * The buffer database fails while Philotes streams under a write load: it crashes (immediate
 * restart), it is down for several backoff rounds, and it blocks (a lock held on cdc_events).
 * The same process must recover by itself each time, the source slot must never be confirmed
 * past what the buffer has stored, and every committed change must land exactly once, in order.
 */
import type pg from 'pg';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { freePort } from '../support/cluster.js';
import {
  expectEveryChangeOnce,
  connect,
  ITEMS_DDL,
  startFixture,
  startLoad,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import {
  countEvents,
  countEventsBeyondCheckpoint,
  lsn,
  outputTail,
  readCheckpoint,
  readMetric,
  readSlot,
  sampleFor,
  type StoredCheckpoint,
  waitForEventGrowth,
  waitForExit,
  waitForMetric,
  whileRunning,
} from '../support/faults.js';
import { formatLsn } from '../../src/common/lsn.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const GROWTH = 200;
const RESTARTS = 'philotes_reader_restarts_total';

describe('buffer database outages while streaming', () => {
  let f: Fixture;
  let philotes: PhilotesProcess;
  let metricsPort: number;
  let load: ReturnType<typeof startLoad> | undefined;
  let locker: pg.Client | undefined;

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
    metricsPort = await freePort();
    philotes = startPhilotes(f.env({ PHILOTES_METRICS_PORT: String(metricsPort) }));
    await waitForSlotActive(f.source);
  });

  // The SIGTERM test may have run before: every test starts from a running Philotes.
  beforeEach(async () => {
    if (philotes.status() === null) return;
    philotes = startPhilotes(f.env({ PHILOTES_METRICS_PORT: String(metricsPort) }));
    await waitForSlotActive(f.source);
  });

  afterAll(async () => {
    await locker?.end().catch(() => undefined);
    await load?.stop();
    await philotes?.kill9();
    await f?.destroy();
  });

  /** Stops the load, waits for Philotes to catch up, and checks the whole buffer. */
  async function expectExactlyOnce(): Promise<void> {
    const stats = await load!.stop();
    load = undefined;
    expect(stats.committedTransactions).toBeGreaterThan(0);
    await expectEveryChangeOnce(f);
    // The same process recovered: a buffer outage is no reason for Philotes to exit.
    expect(philotes.proc.exitCode, outputTail(philotes)).toBeNull();
  }

  it('recovers by itself from a buffer crash (immediate restart) mid-store', () =>
    whileRunning(philotes, async () => {
      load = startLoad(f.source, { clients: 4 });
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
      const restarts = (await readMetric(metricsPort, RESTARTS)) ?? 0;
      await f.buffer.restart('immediate');
      // Storing failed, so the reader run was restarted; then new changes reach the buffer again.
      await waitForMetric(metricsPort, RESTARTS, restarts + 1);
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
      await expectExactlyOnce();
    }));

  it('waits out a buffer that is down for several backoff rounds, then stores everything', () =>
    whileRunning(philotes, async () => {
      load = startLoad(f.source, { clients: 4 });
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
      const restarts = (await readMetric(metricsPort, RESTARTS)) ?? 0;
      await f.buffer.stop('fast');
      try {
        // Each failed attempt to prepare a new run against the dead buffer counts as a restart.
        await waitForMetric(metricsPort, RESTARTS, restarts + 2);
        // No reader holds the slot while there is nowhere to store what it would read.
        await waitFor(async () => (await readSlot(f.source))?.active === false, {
          what: 'the slot to be released while the buffer is down',
        });
        // Writes go on meanwhile: they must all arrive once the buffer is back.
        const committed = load.stats.committedTransactions;
        await waitFor(() => load!.stats.committedTransactions >= committed + 50, {
          what: '50 more source transactions while the buffer is down',
          timeoutMs: 60_000,
        });
        expect(philotes.proc.exitCode, outputTail(philotes)).toBeNull();
      } finally {
        await f.buffer.start();
      }
      await waitForSlotActive(f.source);
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
      await expectExactlyOnce();
    }));

  it('never confirms to the source past the checkpoint while stores are blocked', () =>
    whileRunning(philotes, async () => {
      load = startLoad(f.source, { clients: 4 });
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);

      locker = await connect(f.buffer, 'buffer');
      await locker.query('BEGIN');
      // Granted once the store in progress (if any) commits; every later store waits behind it.
      await locker.query('LOCK TABLE cdc_events IN ACCESS EXCLUSIVE MODE');
      let checkpoint: StoredCheckpoint | undefined;
      let confirmedAtBlock: bigint;
      let samples: Array<{ confirmed: string | null; checkpoint: string | null }>;
      try {
        // cdc_checkpoints is not locked: read on other connections while the stores wait.
        checkpoint = await readCheckpoint(f.buffer);
        expect(checkpoint).toBeDefined();
        // Proof the fault is real: a Philotes store is waiting for our lock ...
        await waitFor(
          async () => {
            const [row] = await f.buffer.query<{ n: number }>(
              `SELECT count(*)::int AS n FROM pg_stat_activity
              WHERE application_name LIKE 'philotes:buffer%' AND wait_event_type = 'Lock'`,
            );
            return (row?.n ?? 0) > 0;
          },
          { what: 'a Philotes store to wait for the lock on cdc_events' },
        );
        // With a store in flight the reader is not idle, so from here on nothing but the stored
        // checkpoint may be confirmed. (Before, with nothing in flight, confirming the server's WAL
        // end is allowed and can pass the checkpoint: WAL of transactions not yet committed.)
        const slot = await readSlot(f.source);
        confirmedAtBlock = lsn(slot!.confirmedFlushLsn!);
        // ... and the source keeps committing changes there is nowhere to store.
        const committed = load.stats.committedTransactions;
        await waitFor(() => load!.stats.committedTransactions >= committed + 50, {
          what: '50 more source transactions while stores are blocked',
          timeoutMs: 60_000,
        });

        // Several checkpoint intervals (1 s): a confirmation of anything read but not stored
        // would show.
        samples = await sampleFor(3_000, 'the slot and the checkpoint', async () => {
          const slot = await readSlot(f.source);
          const now = await readCheckpoint(f.buffer);
          return { confirmed: slot?.confirmedFlushLsn ?? null, checkpoint: now?.lsn ?? null };
        });
        expect(philotes.proc.exitCode, outputTail(philotes)).toBeNull();
      } finally {
        await locker.query('COMMIT').catch(() => undefined);
        await locker.end().catch(() => undefined);
        locker = undefined;
      }
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);

      // The first transaction stored after the block: its commit record starts at `firstUnstored`.
      // Confirming past that start would have made the server skip it on a reconnect.
      const [next] = await f.buffer.query<{ lsn: string | null }>(
        `SELECT min(lsn)::text AS lsn FROM cdc_events WHERE source_id = 'app' AND lsn >= $1::pg_lsn`,
        [checkpoint!.lsn],
        'buffer',
      );
      expect(next?.lsn, 'changes committed during the block were stored afterwards').toBeTruthy();
      const firstUnstored = lsn(next!.lsn!);
      const stored = lsn(checkpoint!.lsn);
      const bound = stored > confirmedAtBlock ? stored : confirmedAtBlock;
      const report = `checkpoint ${checkpoint!.lsn}, confirmed when blocked ${formatLsn(confirmedAtBlock)}, first unstored commit ${next!.lsn}, samples ${JSON.stringify(samples)}`;
      expect(bound <= firstUnstored, report).toBe(true);
      for (const s of samples) {
        // Nothing is stored while blocked, so the checkpoint does not move ...
        expect(s.checkpoint, report).toBe(checkpoint!.lsn);
        // ... and neither may the slot's confirmed position, beyond it.
        expect(s.confirmed, report).not.toBeNull();
        expect(
          lsn(s.confirmed!) <= bound,
          `confirmed_flush_lsn ${s.confirmed} passed the stored checkpoint: ${report}`,
        ).toBe(true);
      }
      await expectExactlyOnce();
    }));

  it('leaves a consistent buffer and checkpoint on SIGTERM (after the outages, when they ran first)', async () => {
    expect(philotes.signal('SIGTERM')).toBe(true);
    const exit = await waitForExit(philotes, 30_000);
    expect(exit, outputTail(philotes)).toEqual({ code: 0, signal: null });
    expect(await countEventsBeyondCheckpoint(f.buffer)).toBe(0);
    const checkpoint = await readCheckpoint(f.buffer);
    const slot = await readSlot(f.source);
    expect(lsn(slot!.confirmedFlushLsn!)).toBeGreaterThanOrEqual(lsn(checkpoint!.lsn));
  });
});
