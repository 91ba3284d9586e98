/**
 * Retention decides on final partitions only (docs/design/consumers.md §7): a partition past
 * retention receives rows from any storing transaction that began before its end, and such a
 * transaction may commit after the check of which groups have read it. The keeper must not drop
 * the partition while one is open, and must then see the rows it stored.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BufferStore } from '../../src/buffer/store.js';
import type { ConnectionConfig } from '../../src/common/config.js';
import { createLogger } from '../../src/common/logger.js';
import { BufferKeeper } from '../../src/supervisor/buffer-keeper.js';
import { startCluster, type Cluster } from '../support/cluster.js';
import { connectionOf } from '../support/fixture.js';
import { waitFor } from '../support/poll.js';

const log = createLogger('silent');
const INTERVAL_MS = 10_000;

describe('retention and a storing transaction still open', () => {
  let cluster: Cluster;
  let conn: ConnectionConfig;
  let store: BufferStore | undefined;
  let keeper: BufferKeeper | undefined;
  const clients: pg.Client[] = [];

  beforeAll(async () => {
    cluster = await startCluster();
    await cluster.createDatabase('buffer');
    conn = connectionOf(cluster, 'buffer');
  });

  afterAll(async () => {
    await keeper?.stop();
    for (const c of clients) await c.end().catch(() => undefined);
    await store?.close().catch(() => undefined);
    await cluster?.destroy();
  });

  async function client(): Promise<pg.Client> {
    const c = new pg.Client({ connectionString: cluster.url('buffer') });
    await c.connect();
    clients.push(c);
    return c;
  }

  it('keeps a partition a transaction may still store into, and then the rows it stored', async () => {
    const settings = { partitionIntervalMs: INTERVAL_MS, partitionsAhead: 1 };
    // Migrates and partitions the buffer, as a capturing process does at start.
    store = await BufferStore.open(conn, log, 2, undefined, settings);
    keeper = new BufferKeeper(conn, { ...settings, retentionMs: 1, retentionMaxMs: 0 }, log, {
      size: () => undefined,
      consumers: () => undefined,
      dropped: () => undefined,
      expired: () => undefined,
    });
    const sql = await client();
    await sql.query(
      `SELECT philotes_create_consumer('g');
       INSERT INTO cdc_consumer_offsets (consumer, source_id, lsn, seq) VALUES ('g', 'x', '0/0', -1)`,
    );
    // A storing transaction that begins now: its rows go to the partition of its start.
    const writer = await client();
    await writer.query('BEGIN');
    const [{ partition, to_at: toAt }] = (
      await writer.query<{ partition: string; to_at: Date }>(
        `SELECT name AS partition, to_at FROM cdc_partitions
          WHERE coalesce(from_at, '-infinity') <= now() AND to_at > now()`,
      )
    ).rows as [{ partition: string; to_at: Date }];
    const live = async () =>
      (
        await sql.query(`SELECT 1 FROM cdc_partitions WHERE name = $1 AND dropped_at IS NULL`, [
          partition,
        ])
      ).rows.length === 1;
    await waitFor(
      async () =>
        (await sql.query<{ past: boolean }>('SELECT now() >= $1 AS past', [toAt])).rows[0]!.past,
      { what: 'the partition to end', timeoutMs: 3 * INTERVAL_MS + 10_000 },
    );
    // Past retention, and no group has anything to read in it yet: but the transaction is open.
    await keeper.round();
    expect(await live(), 'kept while a transaction that may store into it is open').toBe(true);
    await writer.query(
      `INSERT INTO cdc_events (source_id, lsn, seq, xid, committed_at, schema_name, table_name, operation, after)
       VALUES ('x', '0/100', 0, 1, now(), 'public', 't', 'INSERT', '{"id": 1}')`,
    );
    await writer.query('COMMIT');
    const [stored] = (
      await sql.query<{ stored_in: string }>(
        `SELECT tableoid::regclass::text AS stored_in FROM cdc_events WHERE source_id = 'x'`,
      )
    ).rows;
    expect(stored!.stored_in).toBe(partition);
    // Group g has not read the row: held.
    await keeper.round();
    expect(await live(), 'kept while group g has not read its row').toBe(true);
    // Read: dropped.
    await sql.query(`SELECT philotes_commit('g', 'x', '0/100', 0)`);
    await keeper.round();
    expect(await live(), 'dropped once read').toBe(false);
  });
});
