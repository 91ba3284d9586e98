/**
 * An existing unpartitioned buffer with a million events (as a buffer from before schema 11 has
 * them) is converted by the documented step, `philotes-worker partition-buffer`, while Philotes
 * captures under load: the old table becomes the first partition without a rewrite, the million
 * events are all still there, the capture never stopped, and every change of the load is stored
 * exactly once.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BufferStore } from '../../src/buffer/store.js';
import { createLogger } from '../../src/common/logger.js';
import {
  connectionOf,
  expectEveryChangeOnce,
  ITEMS_DDL,
  startFixture,
  startLoad,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { runPhilotesToExit, startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const OLD_EVENTS = 1_000_000;

describe('partitioning an existing buffer', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
  });

  afterAll(async () => {
    await philotes?.kill9();
    await f?.destroy();
  });

  it('converts a million-event buffer online with the capture running, losing nothing', async () => {
    // The buffer as an older Philotes left it: migrated, unpartitioned, a million events of a
    // source of its own (stored an hour ago).
    const store = await BufferStore.open(
      connectionOf(f.buffer, 'buffer'),
      createLogger('silent'),
      1,
    );
    await store.close();
    await f.buffer.query(
      `INSERT INTO cdc_events (source_id, lsn, seq, xid, committed_at, schema_name, table_name,
                               operation, after, primary_key, stored_at)
       SELECT 'old', ('0/' || to_hex(g * 64))::pg_lsn, 0, g, now() - interval '1 hour', 'public',
              't', 'INSERT', jsonb_build_object('id', g, 'pad', repeat('x', 40)), '{id}',
              now() - interval '1 hour'
         FROM generate_series(1, ${OLD_EVENTS}) g;
       INSERT INTO cdc_checkpoints (source_id, lsn) VALUES ('old', '0/F4240C0')`,
      [],
      'buffer',
    );
    const [before] = await f.buffer.query<{ kind: string; mb: number }>(
      `SELECT relkind::text AS kind, (pg_relation_size('cdc_events') / 1048576)::int AS mb
         FROM pg_class WHERE oid = 'cdc_events'::regclass`,
      [],
      'buffer',
    );
    // Too large for the running Philotes to convert by itself: the operator's step.
    expect(before).toMatchObject({ kind: 'r' });
    expect(before!.mb).toBeGreaterThan(64);

    philotes = startPhilotes(f.env());
    await waitForSlotActive(f.source);
    // After the slot exists: every change of the load is in its stream.
    const load = startLoad(f.source, { clients: 2 });
    let stored: number;
    try {
      const count = async () =>
        (
          await f.buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE source_id = 'app'`,
            [],
            'buffer',
          )
        )[0]!.n;
      await waitFor(async () => (await count()) > 200, {
        what: 'the capture to store',
        timeoutMs: 60_000,
      });
      const run = await runPhilotesToExit(
        Object.fromEntries(
          Object.entries(f.env()).filter(([k]) => k.startsWith('PHILOTES_BUFFER_')),
        ),
        300_000,
        { args: ['partition-buffer'] },
      );
      expect(run.code, run.stderr.join('\n')).toBe(0);
      expect(run.stdout.join('\n')).toMatch(/cdc_events is partitioned/);
      console.log(`partition-buffer: ${run.stdout.join(' ')}`);
      stored = await count();
      // The capture goes on storing after the switch.
      await waitFor(async () => (await count()) > stored + 200, {
        what: 'the capture to store after the switch',
        timeoutMs: 60_000,
      });
    } finally {
      await load.stop();
    }
    const [after] = await f.buffer.query<{ kind: string; old: number; partitions: number }>(
      `SELECT (SELECT relkind::text FROM pg_class WHERE oid = 'cdc_events'::regclass) AS kind,
              (SELECT count(*)::int FROM cdc_events WHERE source_id = 'old') AS old,
              (SELECT count(*)::int FROM pg_inherits WHERE inhparent = 'cdc_events'::regclass) AS partitions`,
      [],
      'buffer',
    );
    expect(after).toMatchObject({ kind: 'p', old: OLD_EVENTS });
    expect(after!.partitions).toBeGreaterThanOrEqual(2);
    // The documented read works on the partitioned table.
    await f.buffer.query(`SELECT philotes_create_consumer('after_switch')`, [], 'buffer');
    const [read] = await f.buffer.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM philotes_read('after_switch', 'old', 10)`,
      [],
      'buffer',
    );
    expect(read!.n).toBe(10);
    await expectEveryChangeOnce(f);
  });
});
