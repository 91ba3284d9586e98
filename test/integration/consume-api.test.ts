/**
 * The consume() API as a service uses it: a handler that writes its effects through the batch's
 * transaction gets every event once, in order; a gap recorded in cdc_gaps comes as a `gap` record
 * in its place; events retracted after the consumer took them (a source reset to another history)
 * come as `retracted` records, newest first, before anything else, and the consumer then reads the
 * new history from where the old one was cut, so nothing of it is skipped.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { consume, type ConsumedRecord, type Consumer } from '../../src/index.js';
import { BufferStore } from '../../src/buffer/store.js';
import { createLogger } from '../../src/common/logger.js';
import {
  connectionOf,
  connect,
  ITEMS_DDL,
  startFixture,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('consume() API', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;
  let consumer: Consumer | undefined;
  const seen: ConsumedRecord[] = [];

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
    await f.buffer.query(
      `CREATE TABLE mirror (id bigint PRIMARY KEY, client int, name text);
       CREATE TABLE undone (lsn pg_lsn, seq int, at serial)`,
      [],
      'buffer',
    );
  });

  afterAll(async () => {
    await consumer?.stop();
    await philotes?.kill9();
    await f?.destroy();
  });

  /** The service: keeps `mirror` equal to the source's items, exactly once. */
  async function apply(records: readonly ConsumedRecord[], tx: pg.ClientBase): Promise<void> {
    for (const r of records) {
      seen.push(r);
      if (r.kind === 'event' && (r.operation === 'INSERT' || r.operation === 'SNAPSHOT'))
        await tx.query('INSERT INTO mirror (id, client, name) VALUES ($1, $2, $3)', [
          r.after!['id'],
          r.after!['client'],
          r.after!['name'],
        ]);
      else if (r.kind === 'event' && r.operation === 'UPDATE')
        await tx.query('UPDATE mirror SET name = $2 WHERE id = $1', [
          r.after!['id'],
          r.after!['name'],
        ]);
      else if (r.kind === 'event' && r.operation === 'DELETE')
        await tx.query('DELETE FROM mirror WHERE id = $1', [r.before!['id']]);
      else if (r.kind === 'retracted') {
        // Undo: newest first, so each undo sees the state its event left.
        if (r.operation === 'INSERT')
          await tx.query('DELETE FROM mirror WHERE id = $1', [r.after!['id']]);
        await tx.query('INSERT INTO undone (lsn, seq) VALUES ($1, $2)', [r.lsn, r.seq]);
      }
    }
  }

  async function mirror(client?: number): Promise<string[]> {
    const rows = await f.buffer.query<{ name: string }>(
      'SELECT name FROM mirror WHERE $1::int IS NULL OR client = $1 ORDER BY id',
      [client ?? null],
      'buffer',
    );
    return rows.map((r) => r.name);
  }

  async function sourceNames(client: number): Promise<string[]> {
    const rows = await f.source.query<{ name: string }>(
      'SELECT name FROM items WHERE client = $1 ORDER BY id',
      [client],
      'app',
    );
    return rows.map((r) => r.name);
  }

  /** The service, running (each case may be the first). */
  async function running(): Promise<Consumer> {
    consumer ??= await consume({
      buffer: f.buffer.url('buffer'),
      group: 'mirror',
      batchSize: 7,
      pollIntervalMs: 200,
      handler: (batch, tx) => apply(batch.records, tx),
      logger: createLogger('silent'),
    });
    return consumer;
  }

  it('applies every event once, in order, through the transaction it is given', async () => {
    const consumer = await running();
    for (let i = 1; i <= 20; i++)
      await f.source.query(`INSERT INTO items (client, name) VALUES (1, 'r${i}')`, [], 'app');
    await f.source.query(
      `UPDATE items SET name = name || '+' WHERE client = 1 AND id % 3 = 0`,
      [],
      'app',
    );
    await f.source.query(`DELETE FROM items WHERE client = 1 AND id % 5 = 0`, [], 'app');
    const want = await sourceNames(1);
    await waitFor(async () => JSON.stringify(await mirror(1)) === JSON.stringify(want), {
      what: 'the mirror to equal the source',
      timeoutMs: 60_000,
    });
    expect(consumer.owned()).toEqual(['app']);
    const events = seen.filter((r) => r.kind === 'event');
    // Strictly increasing (lsn, seq): nothing twice, nothing out of order.
    for (let i = 1; i < events.length; i++) {
      const a = events[i - 1]!;
      const b = events[i]!;
      expect(lsnKey(a.lsn, a.seq) < lsnKey(b.lsn, b.seq)).toBe(true);
    }
    const [position] = await f.buffer.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM cdc_consumer_offsets WHERE consumer = 'mirror' AND source_id = 'app'`,
      [],
      'buffer',
    );
    expect(position!.n).toBe(1);
  });

  it('gives a gap in its place, before the events after it', async () => {
    await running();
    // An accepted gap as reset-source records it: from the checkpoint, which moves past it.
    await f.buffer.query(
      `INSERT INTO cdc_gaps (source_id, slot_name, from_lsn, to_lsn, reason, details)
       SELECT 'app', 'philotes_cdc', lsn::pg_lsn, lsn::pg_lsn, 'slot_missing', '{"test": true}'
         FROM cdc_checkpoints WHERE source_id = 'app'`,
      [],
      'buffer',
    );
    await f.source.query(`INSERT INTO items (client, name) VALUES (1, 'after the gap')`, [], 'app');
    await waitFor(
      () => seen.some((r) => r.kind === 'event' && r.after?.['name'] === 'after the gap'),
      {
        what: 'the event after the gap',
        timeoutMs: 60_000,
      },
    );
    const gapAt = seen.findIndex((r) => r.kind === 'gap');
    const eventAt = seen.findIndex(
      (r) => r.kind === 'event' && r.after?.['name'] === 'after the gap',
    );
    expect(gapAt).toBeGreaterThan(-1);
    expect(gapAt).toBeLessThan(eventAt);
    expect(seen[gapAt]).toMatchObject({ kind: 'gap', source: 'app', reason: 'slot_missing' });
    expect(seen.filter((r) => r.kind === 'gap')).toHaveLength(1);
  });

  it('undoes retracted events newest first, then reads the new history from where the old one was cut', async () => {
    // Five more events, then "the source was restored to before them": stop the capture and
    // retract from the first of the five, as reset-source does for a diverged source.
    await running();
    for (let i = 1; i <= 5; i++)
      await f.source.query(`INSERT INTO items (client, name) VALUES (2, 'lost${i}')`, [], 'app');
    await waitFor(async () => (await mirror()).includes('lost5'), {
      what: 'lost5 applied',
      timeoutMs: 60_000,
    });
    await philotes!.kill9();
    const [first] = await f.buffer.query<{ lsn: string }>(
      `SELECT min(lsn)::text AS lsn FROM cdc_events WHERE source_id = 'app' AND after->>'name' = 'lost1'`,
      [],
      'buffer',
    );
    const [checkpoint] = await f.buffer.query<{ lsn: string }>(
      `SELECT lsn FROM cdc_checkpoints WHERE source_id = 'app'`,
      [],
      'buffer',
    );
    const store = await BufferStore.open(
      connectionOf(f.buffer, 'buffer'),
      createLogger('silent'),
      1,
    );
    let rewound: string[];
    try {
      const recorded = await store.recordGap({
        sourceId: 'app',
        slot: 'philotes_cdc',
        checkpointLsn: checkpoint!.lsn,
        gaps: [
          {
            fromLsn: first!.lsn,
            toLsn: checkpoint!.lsn,
            reason: 'retracted',
            details: {},
            retract: true,
          },
        ],
        resumeLsn: checkpoint!.lsn,
        identity: null,
      });
      rewound = recorded.rewoundConsumers;
      expect(recorded.retractedEvents).toBe(5);
    } finally {
      await store.close();
    }
    expect(rewound).toEqual(['mirror']);
    // A consumer of its own through SQL is refused until it has undone them.
    await waitFor(async () => !(await mirror()).includes('lost1'), {
      what: 'the retraction undone',
      timeoutMs: 60_000,
    });
    const undone = await f.buffer.query<{ lsn: string; seq: number }>(
      'SELECT lsn::text, seq FROM undone ORDER BY at',
      [],
      'buffer',
    );
    expect(undone).toHaveLength(5);
    for (let i = 1; i < undone.length; i++)
      expect(
        lsnKey(undone[i - 1]!.lsn, undone[i - 1]!.seq) > lsnKey(undone[i]!.lsn, undone[i]!.seq),
      ).toBe(true);
    // The new history (here: the capture resumes and a new row comes) is read, not skipped.
    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
    await f.source.query(`INSERT INTO items (client, name) VALUES (3, 'new history')`, [], 'app');
    await waitFor(async () => (await mirror()).includes('new history'), {
      what: 'the new history',
      timeoutMs: 60_000,
    });
    expect((await mirror()).filter((n) => n.startsWith('lost'))).toEqual([]);
  });

  it('refuses a raw SQL read while a retraction waits to be undone (PH004)', async () => {
    const client = await connect(f.buffer, 'buffer');
    try {
      // The state a retraction leaves (of a source of this case's own): a retracted event the
      // consumer had taken, and the retraction it has to undo.
      await client.query(`SELECT philotes_create_consumer('sql_reader')`);
      await client.query(
        `WITH g AS (INSERT INTO cdc_gaps (source_id, slot_name, from_lsn, to_lsn, reason)
                    VALUES ('sql_src', 's', '0/10', '0/20', 'retracted') RETURNING id),
              e AS (INSERT INTO cdc_retracted_events (source_id, lsn, seq, xid, committed_at, schema_name,
                      table_name, operation, primary_key, stored_at, gap_id)
                    SELECT 'sql_src', '0/10', 0, 1, now(), 'public', 't', 'INSERT', '{}', now(), id FROM g)
         INSERT INTO cdc_consumer_retractions (consumer, source_id, gap_id, upto_lsn, upto_seq)
         SELECT 'sql_reader', 'sql_src', id, '0/10', 0 FROM g`,
      );
      await expect(
        client.query(`SELECT * FROM philotes_read('sql_reader', 'sql_src')`),
      ).rejects.toMatchObject({
        code: 'PH004',
      });
      const pending = await client.query(
        `SELECT count(*)::int AS n FROM philotes_read_retracted('sql_reader', 'sql_src')`,
      );
      expect(pending.rows[0].n).toBe(1);
      await client.query(`SELECT philotes_commit_retracted('sql_reader', 'sql_src', gap_id, '0/10', 0)
                            FROM cdc_consumer_retractions WHERE consumer = 'sql_reader'`);
      const left = await client.query(
        `SELECT count(*)::int AS n FROM cdc_consumer_retractions WHERE consumer = 'sql_reader'`,
      );
      expect(left.rows[0].n).toBe(0);
      expect(
        (await client.query(`SELECT * FROM philotes_read('sql_reader', 'sql_src')`)).rows,
      ).toEqual([]);
    } finally {
      await client.end();
    }
  });
});

function lsnKey(lsn: string, seq: number): bigint {
  const [hi, lo] = lsn.split('/');
  return (((BigInt(`0x${hi}`) << 32n) | BigInt(`0x${lo}`)) << 32n) + BigInt(seq + 1);
}
