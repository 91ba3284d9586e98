/**
 * The source server restarts while Philotes streams under a write load: once planned (fast
 * shutdown) and once crashed (immediate). A planned shutdown waits for every walsender's client
 * to confirm all WAL sent; with wal_sender_timeout = 0 nothing times that wait out, so a Philotes
 * that does not answer would hold the restart up forever. Afterwards Philotes must reconnect by
 * itself, and the buffer must hold every change exactly once.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  assertReplayMatchesSource,
  checkItemHistories,
  ITEMS_DDL,
  readEvents,
  startFixture,
  startLoad,
  waitForCatchUp,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import {
  countEvents,
  countSourceItems,
  outputTail,
  readSlot,
  waitForEventGrowth,
  waitForExit,
  withDeadline,
} from '../support/faults.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

/** Generous: a shutdown that Philotes does not hold up takes a second or two here. */
const STOP_DEADLINE_MS = 30_000;
const GROWTH = 300;

describe('source server restarts while streaming', () => {
  let f: Fixture;
  let philotes: PhilotesProcess;
  let load: ReturnType<typeof startLoad> | undefined;

  beforeAll(async () => {
    // A walsender waiting for its client's reply never gives up: the test, not a timeout,
    // decides whether Philotes lets the shutdown finish.
    f = await startFixture({ sourceSettings: { wal_sender_timeout: '0' } });
    await f.source.query(ITEMS_DDL, [], 'app');
    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
  });

  // Each test writes under load from a running Philotes, whichever test ran (and stopped) before.
  beforeEach(async () => {
    if (philotes.status() !== null) {
      philotes = startPhilotes(f.env());
      await waitForSlotActive(f.source);
    }
    load = startLoad(f.source, { clients: 4 });
    await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
  });

  afterAll(async () => {
    await load?.stop();
    await philotes?.kill9();
    await f?.destroy();
  });

  /** Restarts the source while streaming; resolves once Philotes streams again and stores more. */
  async function restartSource(mode: 'fast' | 'immediate'): Promise<void> {
    const before = await readSlot(f.source);
    expect(before?.active).toBe(true);
    await withDeadline(
      f.source.stop(mode),
      STOP_DEADLINE_MS,
      `pg_ctl stop -m ${mode} of the source`,
    );
    await f.source.start();
    // A new walsender (new pid) streaming from the slot: Philotes reconnected by itself.
    await waitFor(
      async () => {
        const slot = await readSlot(f.source);
        return slot?.active === true && slot.activePid !== before?.activePid;
      },
      { what: `Philotes to reconnect after a ${mode} restart`, timeoutMs: 60_000 },
    );
    // The load reconnects too; new changes reaching the buffer prove the whole path is back.
    await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH);
    // The same process did it: losing its source is no reason for Philotes to exit.
    expect(philotes.proc.exitCode, outputTail(philotes)).toBeNull();
  }

  /** Stops the load and checks the whole buffer: every change exactly once, the replay equal. */
  async function expectEveryChangeOnce(): Promise<void> {
    const stats = await load!.stop();
    load = undefined;
    expect(stats.committedTransactions).toBeGreaterThan(0);
    await waitForCatchUp(f);
    const rows = checkItemHistories(await readEvents(f.buffer));
    await assertReplayMatchesSource(f.source, rows);
    const sourceRows = await countSourceItems(f.source);
    expect(rows.size).toBe(sourceRows);
  }

  it('a fast (planned) restart is not held up, Philotes reconnects, and every change is stored once', async () => {
    await restartSource('fast');
    await expectEveryChangeOnce();
  });

  it('an immediate restart (crash), Philotes reconnects, and every change is stored once', async () => {
    await restartSource('immediate');
    await expectEveryChangeOnce();
  });

  it('stops cleanly on SIGTERM with every change stored once (after the restarts, when they ran first)', async () => {
    await expectEveryChangeOnce();
    expect(philotes.signal('SIGTERM')).toBe(true);
    const exit = await waitForExit(philotes, 30_000);
    expect(exit, outputTail(philotes)).toEqual({ code: 0, signal: null });
  });
});
