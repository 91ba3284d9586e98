/**
 * The documented read of the buffer (philotes_read / philotes_commit, migration 9) returns
 * whole transactions only. With protocol 1 a large transaction's rows are stored in parts before
 * its commit moves the checkpoint; a kill -9 in the middle leaves those rows in cdc_events until
 * the next start removes them. A consumer reading meanwhile must see none of them, and a
 * consumer that commits its position in the transaction of its effects (rows in a table of its
 * own) ends with exactly the buffer's events: nothing lost, nothing applied twice. A consumer
 * LISTENing on philotes_events is woken when there is something new to read.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  connect,
  ITEMS_DDL,
  startFixture,
  startLoad,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const BIG_ROWS = 60_000;

describe('consuming the buffer through philotes_read', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;
  let consumer: pg.Client;

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
  });

  afterAll(async () => {
    await consumer?.end().catch(() => undefined);
    await philotes?.kill9();
    await f?.destroy();
  });

  /** One batch: read, apply (rows of the consumer's own table), commit the position; all in one transaction. */
  async function consumeOnce(limit = 2000): Promise<number> {
    await consumer.query('BEGIN');
    try {
      const batch = await consumer.query<{ lsn: string; seq: number }>(
        `SELECT lsn::text, seq FROM philotes_read('app_consumer', 'app', $1)`,
        [limit],
      );
      if (batch.rows.length > 0) {
        const last = batch.rows[batch.rows.length - 1]!;
        // A primary key: an event applied twice would fail here.
        await consumer.query(
          `INSERT INTO applied (lsn, seq) SELECT l::pg_lsn, s FROM unnest($1::text[], $2::int[]) AS x(l, s)`,
          [batch.rows.map((r) => r.lsn), batch.rows.map((r) => r.seq)],
        );
        await consumer.query(`SELECT philotes_commit('app_consumer', 'app', $1::pg_lsn, $2)`, [
          last.lsn,
          last.seq,
        ]);
      }
      await consumer.query('COMMIT');
      return batch.rows.length;
    } catch (error) {
      await consumer.query('ROLLBACK');
      throw error;
    }
  }

  it('never returns part of a transaction, across a kill -9 in its middle, and applies every event once', async () => {
    const env = f.env({
      PHILOTES_CDC_PROTOCOL: '1',
      PHILOTES_CDC_BATCH_MAX_ROWS: '1000',
      PHILOTES_CDC_SNAPSHOT: 'never',
    });
    await philotes?.kill9(); // this case's own settings, whatever ran before
    philotes = startPhilotes(env);
    await waitForSlotActive(f.source);
    consumer = await connect(f.buffer, 'buffer');
    await consumer.query(`SELECT philotes_create_consumer('app_consumer')`);
    await consumer.query('CREATE TABLE applied (lsn pg_lsn, seq int, PRIMARY KEY (lsn, seq))');
    await expect(
      consumer.query(`SELECT * FROM philotes_read('nobody', 'app')`),
    ).rejects.toMatchObject({ code: 'PH002' });

    const load = startLoad(f.source, { clients: 2 });
    let consumed = 0;
    let consuming = true;
    const reader = (async () => {
      while (consuming) {
        const n = await consumeOnce().catch(() => 0);
        consumed += n;
        if (n === 0) await new Promise((r) => setTimeout(r, 20));
      }
    })();
    try {
      await f.source.query(
        `INSERT INTO items (client, name, qty) SELECT 99, 'big', g FROM generate_series(1, ${BIG_ROWS}) g`,
        [],
        'app',
      );
      // Part of the big transaction is stored, its commit not yet: kill Philotes right there.
      const partial = async () =>
        (
          await f.buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events e JOIN cdc_checkpoints c USING (source_id)
              WHERE e.lsn >= c.lsn::pg_lsn`,
            [],
            'buffer',
          )
        )[0]!.n;
      await waitFor(async () => (await partial()) >= 5_000, {
        what: 'part of the large transaction to be stored before its commit',
        timeoutMs: 120_000,
        intervalMs: 20,
      });
      await philotes.kill9();
      const stranded = await partial();
      expect(stranded).toBeGreaterThanOrEqual(5_000);
      // Philotes is down and the rows are there: the read returns none of them.
      await consumeOnce(100_000);
      const [leak] = await f.buffer.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM applied a JOIN cdc_checkpoints c ON c.source_id = 'app'
          WHERE a.lsn >= c.lsn::pg_lsn`,
        [],
        'buffer',
      );
      expect(leak!.n).toBe(0);

      philotes = startPhilotes(env);
      await waitForSlotActive(f.source);
    } finally {
      await load.stop();
    }
    // Every event once: the consumer's table is the buffer's events.
    await waitFor(
      async () => {
        const [c] = await f.buffer.query<{ events: number; applied: number; big: number }>(
          `SELECT (SELECT count(*)::int FROM cdc_events WHERE source_id = 'app') AS events,
                  (SELECT count(*)::int FROM applied) AS applied,
                  (SELECT count(*)::int FROM cdc_events WHERE after->>'name' = 'big') AS big`,
          [],
          'buffer',
        );
        return c!.big === BIG_ROWS && c!.applied === c!.events;
      },
      { what: 'the consumer to apply every event', timeoutMs: 120_000 },
    );
    consuming = false;
    await reader;
    const [diff] = await f.buffer.query<{ missing: number; extra: number }>(
      `SELECT (SELECT count(*)::int FROM cdc_events e WHERE source_id = 'app'
                 AND NOT EXISTS (SELECT 1 FROM applied a WHERE a.lsn = e.lsn AND a.seq = e.seq)) AS missing,
              (SELECT count(*)::int FROM applied a
                WHERE NOT EXISTS (SELECT 1 FROM cdc_events e WHERE e.source_id = 'app'
                                    AND e.lsn = a.lsn AND e.seq = a.seq)) AS extra`,
      [],
      'buffer',
    );
    expect(diff).toEqual({ missing: 0, extra: 0 });
    expect(consumed).toBeGreaterThan(BIG_ROWS);
    // A position behind the committed one is refused.
    await expect(
      consumer.query(`SELECT philotes_commit('app_consumer', 'app', '0/1', 0)`),
    ).rejects.toMatchObject({ code: 'PH003' });
  });

  it('wakes a consumer LISTENing on philotes_events when new events can be read', async () => {
    if (philotes?.proc.exitCode !== null || philotes === undefined) {
      philotes = startPhilotes(f.env({ PHILOTES_CDC_SNAPSHOT: 'never' }));
      await waitForSlotActive(f.source);
    }
    const listener = await connect(f.buffer, 'buffer');
    try {
      const woken: string[] = [];
      listener.on('notification', (n) => woken.push(n.payload ?? ''));
      await listener.query('LISTEN philotes_events');
      await listener.query(`SELECT philotes_create_consumer('woken')`);
      await f.source.query(`INSERT INTO items (client, name) VALUES (7, 'wake me')`, [], 'app');
      await waitFor(() => woken.includes('app'), {
        what: 'a wake-up for source app',
        timeoutMs: 30_000,
        intervalMs: 10,
      });
      // Woken, the read finds the event (the wake-up follows the commit that made it readable).
      const events = await listener.query<{ name: string }>(
        `SELECT after->>'name' AS name FROM philotes_read('woken', 'app', 1000000)`,
      );
      expect(events.rows.map((e) => e.name)).toContain('wake me');
    } finally {
      await listener.end();
    }
  });
});
