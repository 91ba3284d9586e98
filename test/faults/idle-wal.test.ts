/**
 * The most reported CDC production incident: a slot on a quiet database pins WAL that other
 * databases of the same cluster keep writing, until the disk fills. Philotes must confirm the
 * server's WAL end while it has nothing in flight, so the slot's restart_lsn follows the WAL.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  connect,
  readEvents,
  startFixture,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';
import { parseLsn } from '../../src/common/lsn.js';

const MB = 1024 * 1024;
/** WAL written in the other database: several times the bound below, so a pinned slot shows. */
const WAL_TO_WRITE = 160 * MB;
/** What the slot may still retain once Philotes has caught up with the idle stream. */
const RETAINED_BOUND = 32 * MB;

interface SlotPosition {
  confirmed: string;
  restart: string;
  retained: number;
  walStatus: string;
}

async function slotPosition(f: Fixture): Promise<SlotPosition> {
  const [row] = await f.source.query<{
    confirmed: string;
    restart: string;
    retained: string;
    wal_status: string;
  }>(
    `SELECT confirmed_flush_lsn::text AS confirmed, restart_lsn::text AS restart, wal_status,
            pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8::text AS retained
       FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
  );
  if (!row) throw new Error('slot philotes_cdc does not exist');
  return {
    confirmed: row.confirmed,
    restart: row.restart,
    retained: Number(row.retained),
    walStatus: row.wal_status,
  };
}

async function currentWalLsn(f: Fixture): Promise<string> {
  const [row] = await f.source.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn');
  return row!.lsn;
}

/** pg_lsn comparison done by the server: LSN text does not sort as text. */
async function lsnAtLeast(f: Fixture, lsn: string, target: string): Promise<boolean> {
  const [row] = await f.source.query<{ ok: boolean }>('SELECT $1::pg_lsn >= $2::pg_lsn AS ok', [
    lsn,
    target,
  ]);
  return row?.ok === true;
}

describe('idle source while WAL moves elsewhere', () => {
  let f: Fixture;
  let philotes: PhilotesProcess;

  beforeAll(async () => {
    f = await startFixture({
      // Small WAL limits make the checkpointer run (and log running-xacts records, which is what
      // lets a logical slot move its restart_lsn) several times while we write.
      sourceSettings: { max_wal_size: '64MB', min_wal_size: '32MB', checkpoint_timeout: '30s' },
    });
    // Published (FOR ALL TABLES) but never written to during the WAL storm.
    await f.source.query('CREATE TABLE quiet (id int PRIMARY KEY, note text)', [], 'app');
    await f.source.createDatabase('other');
    await f.source.query('CREATE TABLE churn (id int PRIMARY KEY, payload text)', [], 'other');
    philotes = startPhilotes(f.env({ PHILOTES_CDC_CHECKPOINT_INTERVAL: '1s' }));
    await waitForSlotActive(f.source);
  });

  afterAll(async () => {
    philotes?.signal('SIGTERM');
    await philotes?.exited;
    await f?.destroy();
  });

  it('keeps the retained WAL bounded and confirms past the WAL written elsewhere', async () => {
    const before = await slotPosition(f);

    // Heavy writes in another database of the same cluster: the slot decodes this WAL (a slot
    // reads the whole cluster's WAL) but none of it is ours to store.
    const other = await connect(f.source, 'other');
    let written = 0;
    let maxRetained = 0;
    const start = await currentWalLsn(f);
    try {
      for (let round = 0; written < WAL_TO_WRITE; round++) {
        await other.query(
          `INSERT INTO churn SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 20000) g
             ON CONFLICT (id) DO UPDATE SET payload = md5(EXCLUDED.payload || $1::text) || EXCLUDED.payload`,
          [round],
        );
        // A CHECKPOINT logs a running-xacts record right away (the bgwriter does so only every 15s).
        await other.query('CHECKPOINT');
        const [row] = (
          await other.query<{ written: string }>(
            'SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::int8::text AS written',
            [start],
          )
        ).rows;
        written = Number(row!.written);
        maxRetained = Math.max(maxRetained, (await slotPosition(f)).retained);
      }
    } finally {
      await other.end();
    }
    const end = await currentWalLsn(f);

    // Once the writes stop, Philotes is idle: it must confirm the WAL end it is told about, and
    // the slot must let go of the WAL behind it.
    const after = await waitFor(
      async () => {
        const p = await slotPosition(f);
        return p.retained < RETAINED_BOUND && (await lsnAtLeast(f, p.confirmed, end)) ? p : false;
      },
      {
        what: `slot to retain < ${RETAINED_BOUND / MB} MB and confirm ${end}`,
        timeoutMs: 120_000,
        intervalMs: 500,
      },
    );
    console.log(
      `idle-wal: wrote ${(written / MB).toFixed(0)} MB elsewhere; slot retained at most ${(maxRetained / MB).toFixed(1)} MB while writing, ${(after.retained / MB).toFixed(1)} MB after; confirmed ${before.confirmed} -> ${after.confirmed}`,
    );

    expect(written).toBeGreaterThanOrEqual(WAL_TO_WRITE);
    expect(after.retained).toBeLessThan(RETAINED_BOUND);
    expect(await lsnAtLeast(f, after.confirmed, end)).toBe(true);
    expect(await lsnAtLeast(f, after.restart, before.restart)).toBe(true);
    expect(after.restart).not.toBe(before.restart);
    expect(after.walStatus).toBe('reserved');
    // Nothing was written to the published database meanwhile, so nothing was stored. (What the
    // other test wrote to it, if it ran first, is from before.)
    const stored = await readEvents(f.buffer);
    expect(stored.filter((e) => parseLsn(e.lsn) >= parseLsn(start))).toEqual([]);
  });

  it('still captures a change made after the idle period, once', async () => {
    // Confirming the WAL end while idle must not skip what comes next.
    await f.source.query(`INSERT INTO quiet VALUES (1, 'after the storm')`, [], 'app');
    const events = await waitFor(
      async () => {
        const rows = await readEvents(f.buffer, 'app', 'quiet');
        return rows.length > 0 ? rows : false;
      },
      { what: 'the insert into quiet to be stored', timeoutMs: 60_000 },
    );
    expect(events.map((e) => [e.operation, e.after])).toEqual([
      ['INSERT', { id: 1, note: 'after the storm' }],
    ]);
  });
});
