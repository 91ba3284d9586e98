/**
 * SIGTERM: Philotes stops reading, stores what is in flight, commits its final checkpoint,
 * confirms it to the source and exits 0. Checked on the data it leaves behind: the checkpoint
 * row, the events, and the slot's confirmed_flush_lsn.
 */
import { afterEach, describe, expect, it } from 'vitest';
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
  countStoredRows,
  countSourceItems,
  lsn,
  outputTail,
  readCheckpoint,
  readLastEvent,
  readSlot,
  waitForEventGrowth,
  waitForExit,
} from '../support/faults.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

/** Generous: the issue asks for "a few seconds"; this only proves the stop does not hang. */
const EXIT_DEADLINE_MS = 30_000;
/** Rows of the one large transaction: many batches' worth, so the stop lands inside it. */
const LARGE_ROWS = 200_000;

describe('SIGTERM', () => {
  let f: Fixture | undefined;
  const started: PhilotesProcess[] = [];

  /** Each test gets its own clusters, with the slot created before any write. */
  async function setUp(
    env: Record<string, string> = {},
  ): Promise<{ f: Fixture; philotes: PhilotesProcess }> {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
    const philotes = start(f, env);
    await waitForSlotActive(f.source);
    return { f, philotes };
  }

  function start(fixture: Fixture, env: Record<string, string> = {}): PhilotesProcess {
    const p = startPhilotes(fixture.env(env));
    started.push(p);
    return p;
  }

  async function stopCleanly(p: PhilotesProcess): Promise<void> {
    expect(p.signal('SIGTERM')).toBe(true);
    const exit = await waitForExit(p, EXIT_DEADLINE_MS);
    expect(exit, outputTail(p)).toEqual({ code: 0, signal: null });
    // It left the fleet before closing the buffer: no member row, no lease of its own.
    const left = await f!.buffer.query<{ members: number; leases: number }>(
      `SELECT (SELECT count(*)::int FROM cdc_members WHERE pid = $1) AS members,
              (SELECT count(*)::int FROM cdc_leases l JOIN cdc_members m ON m.id = l.owner
                WHERE m.pid = $1) AS leases`,
      [p.pid],
      'buffer',
    );
    expect(left[0], outputTail(p)).toEqual({ members: 0, leases: 0 });
  }

  afterEach(async () => {
    for (const p of started.splice(0)) await p.kill9();
    await f?.destroy();
    f = undefined;
  });

  it('after catching up: the final checkpoint is the last stored transaction, and the slot has confirmed it', async () => {
    const { f, philotes } = await setUp();
    const load = startLoad(f.source, { clients: 4 });
    try {
      await waitForEventGrowth(f.buffer, 0, 500);
    } finally {
      await load.stop();
    }
    await waitForCatchUp(f);
    const storedBefore = await countEvents(f.buffer);

    await stopCleanly(philotes);

    const checkpoint = await readCheckpoint(f.buffer);
    const last = await readLastEvent(f.buffer);
    expect(checkpoint).toBeDefined();
    expect(last).toBeDefined();
    // Events carry their transaction's commit START lsn, the checkpoint is the END of the last
    // stored commit record: the same transaction, strictly after its events.
    expect(checkpoint!.transactionId).toBe(last!.xid);
    expect(lsn(checkpoint!.lsn)).toBeGreaterThan(lsn(last!.lsn));
    const [beyond] = await f.buffer.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM cdc_events WHERE source_id = 'app' AND lsn >= $1::pg_lsn`,
      [checkpoint!.lsn],
      'buffer',
    );
    expect(beyond!.n).toBe(0);
    const slot = await readSlot(f.source);
    expect(slot?.active).toBe(false);
    expect(lsn(slot!.confirmedFlushLsn!)).toBeGreaterThanOrEqual(lsn(checkpoint!.lsn));
    // Stopping stored nothing new (it was caught up) and removed nothing.
    expect(await countEvents(f.buffer)).toBe(storedBefore);
    const rows = checkItemHistories(await readEvents(f.buffer));
    await assertReplayMatchesSource(f.source, rows);
  });

  it('during a write load: exits 0, and the next run completes the history exactly once', async () => {
    const { f, philotes } = await setUp();
    const load = startLoad(f.source, { clients: 4 });
    let stats;
    try {
      await waitForEventGrowth(f.buffer, 0, 500);
      expect(philotes.signal('SIGTERM')).toBe(true);
    } finally {
      // Right after the signal: the stop races with writes still arriving.
      stats = await load.stop();
    }
    const exit = await waitForExit(philotes, EXIT_DEADLINE_MS);
    expect(exit, outputTail(philotes)).toEqual({ code: 0, signal: null });
    expect(stats.committedTransactions).toBeGreaterThan(0);

    // What the stop left behind: a checkpoint naming a stored transaction, confirmed to the slot.
    const checkpoint = await readCheckpoint(f.buffer);
    expect(checkpoint).toBeDefined();
    const slot = await readSlot(f.source);
    expect(slot?.active).toBe(false);
    expect(lsn(slot!.confirmedFlushLsn!)).toBeGreaterThanOrEqual(lsn(checkpoint!.lsn));
    const [named] = await f.buffer.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM cdc_events
        WHERE source_id = 'app' AND xid = $1::bigint AND lsn < $2::pg_lsn`,
      [checkpoint!.transactionId, checkpoint!.lsn],
      'buffer',
    );
    expect(named!.n).toBeGreaterThan(0);

    // The writes after the stop are the next run's to capture.
    const next = start(f);
    // Streaming before it is stopped: a signal during its start-up is not what this is about.
    await waitForSlotActive(f.source);
    await waitForCatchUp(f);
    const rows = checkItemHistories(await readEvents(f.buffer));
    await assertReplayMatchesSource(f.source, rows);
    await stopCleanly(next);
  });

  it('while a large transaction streams: the final position still reaches the source', async () => {
    // A long checkpoint interval leaves the shutdown's own confirmation as the only one that can
    // move the slot, so the test sees whether that one arrives.
    const { f, philotes } = await setUp({ PHILOTES_CDC_CHECKPOINT_INTERVAL: '1m' });
    await f.source.query(
      `INSERT INTO items (client, name) SELECT 0, 'small ' || g FROM generate_series(1, 10) g`,
      [],
      'app',
    );
    await waitFor(async () => (await readCheckpoint(f.buffer)) ?? false, {
      what: 'the small transaction to be checkpointed',
    });
    // One transaction, far more than one batch: while the server replays it to Philotes, the
    // walsender is busy sending when the stop closes the connection.
    await f.source.query(
      `INSERT INTO items (client, name, big)
       SELECT 1, 'large ' || g, repeat(md5(g::text), 10) FROM generate_series(1, ${LARGE_ROWS}) g`,
      [],
      'app',
    );
    // Stored as events, or (protocol 2) staged while the source streams it.
    await waitForEventGrowth(
      f.buffer,
      await countStoredRows(f.buffer),
      20_000,
      60_000,
      countStoredRows,
    );
    await stopCleanly(philotes);

    const checkpoint = await readCheckpoint(f.buffer);
    const [small] = await f.buffer.query<{ n: number; xid: string; max: string }>(
      `SELECT count(*)::int AS n, min(xid)::text AS xid, max(lsn)::text AS max FROM cdc_events
        WHERE source_id = 'app' AND (after->>'client')::int = 0`,
      [],
      'buffer',
    );
    // The large transaction is cut: the checkpoint still names the small one, fully stored.
    expect(small!.n).toBe(10);
    expect(checkpoint!.transactionId).toBe(small!.xid);
    expect(lsn(checkpoint!.lsn)).toBeGreaterThan(lsn(small!.max));
    const slot = await readSlot(f.source);
    expect(slot?.active).toBe(false);
    expect(
      lsn(slot!.confirmedFlushLsn!),
      `slot confirmed_flush_lsn ${slot!.confirmedFlushLsn} behind checkpoint ${checkpoint!.lsn}`,
    ).toBeGreaterThanOrEqual(lsn(checkpoint!.lsn));

    // The next run removes the cut part and stores the large transaction once. Counted in SQL:
    // its rows are too many to replay one by one here.
    const next = start(f);
    // Streaming before it is stopped: a signal during its start-up is not what this is about.
    await waitForSlotActive(f.source);
    await waitForCatchUp(f);
    const [stored] = await f.buffer.query<{ events: number; ids: number; other: number }>(
      `SELECT count(*) FILTER (WHERE operation = 'INSERT')::int AS events,
              count(DISTINCT after->>'id')::int AS ids,
              count(*) FILTER (WHERE operation <> 'INSERT')::int AS other
         FROM cdc_events WHERE source_id = 'app' AND table_name = 'items'`,
      [],
      'buffer',
    );
    expect(stored).toEqual({ events: LARGE_ROWS + 10, ids: LARGE_ROWS + 10, other: 0 });
    const sourceRows = await countSourceItems(f.source);
    expect(sourceRows).toBe(LARGE_ROWS + 10);
    await stopCleanly(next);
  });
});
