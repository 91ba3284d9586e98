/**
 * The source's walsender fails while Philotes streams under a write load: it is terminated
 * (pg_terminate_backend, three times over), and it freezes (SIGSTOP: the connection stays open
 * and says nothing, as with a hung server or a silent network partition). Philotes must notice
 * each time by itself, reconnect to the slot, and store every committed change exactly once.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { freePort } from '../support/cluster.js';
import {
  expectEveryChangeOnce,
  ITEMS_DDL,
  startFixture,
  startLoad,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import {
  countEvents,
  freezeProcess,
  outputTail,
  readMetric,
  readSlot,
  waitForEventGrowth,
  waitForExit,
  waitForMetric,
  whileRunning,
  waitForNewWalsender,
} from '../support/faults.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const GROWTH = 200;
const TERMINATIONS = 3;
const RESTARTS = 'philotes_reader_restarts_total';

describe('walsender failures while streaming', () => {
  let f: Fixture;
  let philotes: PhilotesProcess;
  let metricsPort: number;
  let load: ReturnType<typeof startLoad> | undefined;
  let thaw: (() => void) | undefined;

  const env = () =>
    f.env({
      PHILOTES_METRICS_PORT: String(metricsPort),
      // A silent connection is given up after 3 s; status updates (which ask the server for a
      // reply) go out every second.
      PHILOTES_CDC_SOURCE_TIMEOUT: '3s',
      PHILOTES_CDC_CHECKPOINT_INTERVAL: '1s',
    });

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
    metricsPort = await freePort();
    philotes = startPhilotes(env());
    await waitForSlotActive(f.source);
  });

  // The stop test may have run before: every test starts from a running Philotes.
  beforeEach(async () => {
    if (philotes.status() === null) return;
    philotes = startPhilotes(env());
    await waitForSlotActive(f.source);
  });

  afterAll(async () => {
    thaw?.();
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
    // The same process did it all: losing a walsender is no reason for Philotes to exit.
    expect(philotes.proc.exitCode, outputTail(philotes)).toBeNull();
  }

  it(`reconnects after its walsender is terminated, ${TERMINATIONS} times`, () =>
    whileRunning(philotes, async () => {
      load = startLoad(f.source, { clients: 4 });
      for (let i = 1; i <= TERMINATIONS; i++) {
        await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
        const before = await readSlot(f.source);
        expect(before?.active).toBe(true);
        const [terminated] = await f.source.query<{ ok: boolean }>(
          'SELECT pg_terminate_backend($1) AS ok',
          [before!.activePid],
        );
        expect(terminated?.ok).toBe(true);
        await waitForNewWalsender(f.source, before!.activePid);
      }
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
      await expectExactlyOnce();
    }));

  it('drops a frozen walsender after the source timeout and resumes from the slot', () =>
    whileRunning(philotes, async () => {
      load = startLoad(f.source, { clients: 4 });
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
      const before = await readSlot(f.source);
      expect(before?.active).toBe(true);
      const frozenPid = before!.activePid!;
      const restarts = (await readMetric(metricsPort, RESTARTS)) ?? 0;

      thaw = freezeProcess(frozenPid);
      try {
        // Philotes hears nothing and gives the connection up (one restart), then tries the slot
        // again and is refused while the frozen walsender still holds it (another), and goes on.
        await waitForMetric(metricsPort, RESTARTS, restarts + 2);
        // Writes during the freeze: none can be streamed until the walsender is gone.
        const committed = load.stats.committedTransactions;
        await waitFor(() => load!.stats.committedTransactions >= committed + 50, {
          what: '50 more source transactions while the walsender is frozen',
          timeoutMs: 60_000,
        });
        expect((await readSlot(f.source))?.activePid).toBe(frozenPid);
        expect(philotes.proc.exitCode, outputTail(philotes)).toBeNull();
      } finally {
        thaw();
      }

      // Thawed, the walsender finds its client gone and exits, which frees the slot.
      await waitFor(
        async () =>
          (await f.source.query('SELECT 1 FROM pg_stat_activity WHERE pid = $1', [frozenPid]))
            .length === 0,
        { what: `the thawed walsender ${frozenPid} to exit`, timeoutMs: 60_000 },
      );
      await waitForNewWalsender(f.source, frozenPid);
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
      await expectExactlyOnce();
    }));

  it('stops cleanly afterwards', async () => {
    expect(philotes.signal('SIGTERM')).toBe(true);
    const exit = await waitForExit(philotes, 30_000);
    expect(exit, outputTail(philotes)).toEqual({ code: 0, signal: null });
  });
});
