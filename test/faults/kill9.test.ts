/**
 * kill -9 of the Philotes process during a steady write load, three times over. Whatever a kill
 * interrupts (a COPY into the buffer, a half-stored large transaction, a confirmation to the
 * source), the next process must resume from the checkpoint so the buffer ends up holding every
 * committed change exactly once, in order.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
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
  countEventsBeyondCheckpoint,
  lsn,
  outputTail,
  readCheckpoint,
  readLastEvent,
  readSlot,
  waitForEventGrowth,
  waitForExit,
} from '../support/faults.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';

const KILLS = 3;
/** Events each process must store before it is killed: proof it was streaming, not starting. */
const GROWTH_PER_ROUND = 300;

describe('kill -9 during a steady write load', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;

  beforeAll(async () => {
    // Commit times of the buffer's transactions: the order the events became visible in.
    f = await startFixture({ bufferSettings: { track_commit_timestamp: 'on' } });
    await f.source.query(ITEMS_DDL, [], 'app');
  });

  afterAll(async () => {
    await philotes?.kill9();
    await f?.destroy();
  });

  it('keeps every committed change exactly once across three kills', async () => {
    // Batches of a few rows split most load transactions (up to 6 changes each) over several
    // buffer transactions, so a kill regularly lands between the parts of one source transaction
    // and the next start has to remove the stored part.
    const env = f.env({ PHILOTES_CDC_BATCH_MAX_ROWS: '4' });
    // The slot must exist before the first write: changes committed before it are not Philotes'
    // to capture (there is no initial snapshot).
    philotes = startPhilotes(env);
    await waitForSlotActive(f.source);
    const load = startLoad(f.source, { clients: 4 });
    try {
      for (let kill = 1; kill <= KILLS; kill++) {
        await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH_PER_ROUND);
        await philotes.kill9();
        philotes = startPhilotes(env);
      }
      // The last process must stream under load too, not only drain after it.
      await waitForEventGrowth(f.buffer, await countEvents(f.buffer), GROWTH_PER_ROUND);
    } finally {
      const stats = await load.stop();
      expect(stats.committedTransactions).toBeGreaterThan(0);
    }

    await waitForCatchUp(f);
    const events = await readEvents(f.buffer);
    const rows = checkItemHistories(events);
    await assertReplayMatchesSource(f.source, rows);
    const sourceRows = await countSourceItems(f.source);
    expect(rows.size).toBe(sourceRows);

    // A clean stop after catching up leaves a buffer a consumer can trust up to the checkpoint:
    // nothing stored beyond it, and the checkpoint names the last stored transaction.
    const current = philotes;
    expect(current.signal('SIGTERM')).toBe(true);
    const exit = await waitForExit(current, 30_000);
    expect(exit, outputTail(current)).toEqual({ code: 0, signal: null });
    expect(await countEventsBeyondCheckpoint(f.buffer)).toBe(0);
    const checkpoint = await readCheckpoint(f.buffer);
    const last = await readLastEvent(f.buffer);
    expect(checkpoint).toBeDefined();
    expect(last).toBeDefined();
    expect(checkpoint!.transactionId).toBe(last!.xid);
    expect(lsn(checkpoint!.lsn)).toBeGreaterThan(lsn(last!.lsn));
    const slot = await readSlot(f.source);
    expect(lsn(slot!.confirmedFlushLsn!)).toBeGreaterThanOrEqual(lsn(checkpoint!.lsn));
    // The stop did not lose or add anything either.
    expect(await countEvents(f.buffer)).toBe(events.length);
    // One buffer transaction at a time per source, in stream order, across the kills and the
    // clean-ups after them: no event committed before one it follows in (lsn, seq) order. A
    // consumer's position per source rests on it (docs/design/consumers.md §1).
    const [order] = await f.buffer.query<{ transactions: number; inversions: number }>(
      `SELECT count(DISTINCT xmin::text)::int AS transactions,
              count(*) FILTER (WHERE committed < before)::int AS inversions
         FROM (SELECT xmin, pg_xact_commit_timestamp(xmin) AS committed,
                      max(pg_xact_commit_timestamp(xmin)) OVER (ORDER BY lsn, seq
                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
                 FROM cdc_events WHERE source_id = 'app') e`,
      [],
      'buffer',
    );
    expect(order!.transactions).toBeGreaterThan(KILLS);
    expect(order!.inversions).toBe(0);
  });
});
