/**
 * A transaction whose last event fills a batch: the batch goes out, and the transaction's commit
 * arrives afterwards into an empty batch. That commit must still reach the buffer before the
 * source is confirmed past it. Otherwise the buffer's checkpoint stays before the transaction
 * (a restart deletes its events as an incomplete transaction) while the slot has moved past it
 * (and never sends it again): the events would be lost.
 */
import { afterEach, describe, expect, it } from 'vitest';
import {
  expectEveryChangeOnce,
  ITEMS_DDL,
  startFixture,
  waitForCatchUp,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import {
  countEvents,
  lsn,
  outputTail,
  readCheckpoint,
  readLastEvent,
  readSlot,
  waitForExit,
} from '../support/faults.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';

const BATCH_ROWS = 10;
/**
 * Long enough that batches close only on the row limit, so each transaction's last row closes
 * one and its commit comes after, every time (an early send would split the rows elsewhere).
 */
const BATCH_WAIT = '2s';

describe('a transaction ending exactly on a batch boundary', () => {
  let f: Fixture | undefined;
  const started: PhilotesProcess[] = [];

  afterEach(async () => {
    for (const p of started.splice(0)) await p.kill9();
    await f?.destroy();
    f = undefined;
  });

  function start(fixture: Fixture): PhilotesProcess {
    const p = startPhilotes(
      fixture.env({
        PHILOTES_CDC_BATCH_MAX_ROWS: String(BATCH_ROWS),
        PHILOTES_CDC_BATCH_MAX_WAIT: BATCH_WAIT,
      }),
    );
    started.push(p);
    return p;
  }

  it('is stored with its checkpoint before the slot passes it, and survives a restart', async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
    const first = start(f);
    await waitForSlotActive(f.source);

    // Transactions of exactly one and two batches: each ends right on a batch boundary.
    const sizes = [BATCH_ROWS, BATCH_ROWS, 2 * BATCH_ROWS, BATCH_ROWS];
    for (const [i, n] of sizes.entries()) {
      await f.source.query(
        `INSERT INTO items (client, name, qty) SELECT $1, 'row ' || g, g FROM generate_series(1, $2) g`,
        [i, n],
        'app',
      );
    }
    const total = sizes.reduce((a, b) => a + b, 0);

    // The slot confirms past everything (the idle confirmation)...
    await waitForCatchUp(f);
    expect(await countEvents(f.buffer)).toBe(total);
    // ...and by then the buffer's checkpoint has passed the last transaction: the end of its
    // commit record lies after the commit LSN its events carry.
    const checkpoint = await readCheckpoint(f.buffer);
    const last = await readLastEvent(f.buffer);
    expect(checkpoint, 'a checkpoint for the stored transactions').toBeDefined();
    expect(lsn(checkpoint!.lsn)).toBeGreaterThan(lsn(last!.lsn));
    expect(lsn((await readSlot(f.source))!.confirmedFlushLsn!)).toBeGreaterThanOrEqual(
      lsn(checkpoint!.lsn),
    );

    // A restart removes whatever lies beyond the checkpoint: nothing may.
    expect(first.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(first, 30_000), outputTail(first)).toEqual({ code: 0, signal: null });
    start(f);
    await waitForSlotActive(f.source);
    await f.source.query(
      `INSERT INTO items (client, name, qty) VALUES (99, 'after', 1)`,
      [],
      'app',
    );
    await expectEveryChangeOnce(f);
    expect(await countEvents(f.buffer)).toBe(total + 1);
  });
});
