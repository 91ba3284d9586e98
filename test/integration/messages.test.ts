/**
 * Application messages (pg_logical_emit_message) with a configured prefix land as MESSAGE
 * events in their transaction, in order with its rows: the outbox pattern without an outbox
 * table. A non-transactional one lands on its own, between transactions, once — across a kill -9
 * too. Other prefixes and rolled-back messages do not.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('logical messages', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query('CREATE TABLE t (id int PRIMARY KEY)', [], 'app');
    philotes = startPhilotes(f.env({ PHILOTES_CDC_MESSAGES: 'outbox, audit' }));
    await waitForSlotActive(f.source);
  });

  afterAll(async () => {
    await philotes?.kill9();
    await f?.destroy();
  });

  it('stores transactional messages with a captured prefix as MESSAGE events, in order with the rows', async () => {
    // Only what this test writes: from here on, whichever test ran before.
    const [start] = await f.source.query<{ lsn: string }>(
      'SELECT pg_current_wal_lsn()::text AS lsn',
      [],
      'app',
    );
    await f.source.query(
      `BEGIN;
       INSERT INTO t VALUES (1);
       SELECT pg_logical_emit_message(true, 'outbox', '{"order": 1, "note": "é"}');
       SELECT pg_logical_emit_message(true, 'ignored', 'not captured');
       SELECT pg_logical_emit_message(true, 'audit', '\\x00ff'::bytea);
       INSERT INTO t VALUES (2);
       COMMIT;
       SELECT pg_logical_emit_message(false, 'outbox', 'not transactional');
       BEGIN;
       SELECT pg_logical_emit_message(true, 'outbox', 'rolled back');
       ROLLBACK;
       INSERT INTO t VALUES (3);`,
      [],
      'app',
    );
    const events = await waitFor(
      async () => {
        const rows = await f.buffer.query<{
          operation: string;
          table_name: string;
          after: { id: number } | null;
          details: Record<string, unknown> | null;
          same_tx: boolean;
        }>(
          `SELECT operation, table_name, after, details,
                  lsn = first_value(lsn) OVER (ORDER BY lsn, seq) AS same_tx
             FROM cdc_events WHERE source_id = 'app' AND lsn > $1::pg_lsn
            ORDER BY cdc_events.lsn, seq`,
          [start!.lsn],
          'buffer',
        );
        return rows.some((r) => r.after?.id === 3) ? rows : false;
      },
      { what: 'the marker row', timeoutMs: 30_000 },
    );
    expect(events.map((e) => [e.operation, e.table_name, e.after?.id ?? e.details])).toEqual([
      ['INSERT', 't', 1],
      [
        'MESSAGE',
        '',
        { prefix: 'outbox', transactional: true, content: '{"order": 1, "note": "é"}' },
      ],
      ['MESSAGE', '', { prefix: 'audit', transactional: true, content_hex: '00ff' }],
      ['INSERT', 't', 2],
      ['MESSAGE', '', { prefix: 'outbox', transactional: false, content: 'not transactional' }],
      ['INSERT', 't', 3],
    ]);
    // The messages share their transaction's commit LSN; the non-transactional one has its own.
    expect(events.slice(0, 4).every((e) => e.same_tx)).toBe(true);
    expect(events[4]!.same_tx).toBe(false);
  });

  it('stores a non-transactional message once across a kill -9 and a restart', async () => {
    await f.source.query(`SELECT pg_logical_emit_message(false, 'audit', 'standalone')`, [], 'app');
    const count = async (content: string) =>
      (
        await f.buffer.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM cdc_events WHERE source_id = 'app' AND details->>'content' = $1`,
          [content],
          'buffer',
        )
      )[0]!.n;
    await waitFor(async () => (await count('standalone')) === 1, {
      what: 'the standalone message to be stored',
      timeoutMs: 30_000,
    });
    await philotes!.kill9();
    philotes = startPhilotes(f.env({ PHILOTES_CDC_MESSAGES: 'outbox, audit' }));
    await waitForSlotActive(f.source);
    await f.source.query(
      `SELECT pg_logical_emit_message(false, 'audit', 'after restart');
       INSERT INTO t VALUES (4);`,
      [],
      'app',
    );
    await waitFor(
      async () =>
        (
          await f.buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE source_id = 'app' AND after->>'id' = '4'`,
            [],
            'buffer',
          )
        )[0]!.n === 1,
      { what: 'the row after the restart', timeoutMs: 30_000 },
    );
    expect(await count('standalone')).toBe(1);
    expect(await count('after restart')).toBe(1);
  });
});
