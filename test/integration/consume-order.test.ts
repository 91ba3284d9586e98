/**
 * A group reads a source's events in LSN order, by the LSN's value: across the points where its
 * text grows a digit (0/FFFFFF, then 0/1000000), where text order and LSN order part. A read
 * ordered by the text would take 0/1000000 first and commit past 0/9 and 0/FFFFFF for ever.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BufferStore } from '../../src/buffer/store.js';
import { consume, type Consumer } from '../../src/index.js';
import { createLogger } from '../../src/common/logger.js';
import { startCluster, type Cluster } from '../support/cluster.js';
import { connectionOf } from '../support/fixture.js';
import { waitFor } from '../support/poll.js';

const log = createLogger('silent');
/** In LSN order; their text order is 0/1000000, 0/10000000, 0/9, 0/FFFFFF, 1/0, A/0. */
const LSNS = ['0/9', '0/FFFFFF', '0/1000000', '0/10000000', '1/0', 'A/0'];

describe('the order a group reads in', () => {
  let cluster: Cluster;
  let store: BufferStore | undefined;
  let consumer: Consumer | undefined;
  let sql: pg.Client;

  beforeAll(async () => {
    cluster = await startCluster();
    await cluster.createDatabase('buffer');
    store = await BufferStore.open(connectionOf(cluster, 'buffer'), log, 1, undefined, {
      partitionIntervalMs: 86_400_000,
      partitionsAhead: 1,
    });
    sql = new pg.Client({ connectionString: cluster.url('buffer') });
    await sql.connect();
    // Two events at each position, stored in an order of their own, then the checkpoint past all.
    await sql.query(
      `INSERT INTO cdc_events (source_id, lsn, seq, xid, committed_at, schema_name, table_name, operation, after)
       SELECT 'x', l::pg_lsn, s, 1, now(), 'public', 't', 'INSERT', jsonb_build_object('lsn', l, 'seq', s)
         FROM unnest($1::text[]) AS l, generate_series(0, 1) AS s ORDER BY random()`,
      [[...LSNS].reverse()],
    );
    await sql.query(
      `INSERT INTO cdc_checkpoints (source_id, lsn, committed_at, metadata) VALUES ('x', 'B/0', now(), '{}')`,
    );
  });

  afterAll(async () => {
    await consumer?.stop();
    await sql?.end();
    await store?.close();
    await cluster?.destroy();
  });

  const expected = LSNS.flatMap((lsn) => [`${lsn}:0`, `${lsn}:1`]);

  it('delivers every event once, by LSN value, a batch at a time', async () => {
    const seen: string[] = [];
    consumer = await consume({
      buffer: cluster.url('buffer'),
      group: 'api',
      sources: ['x'],
      batchSize: 3,
      logger: log,
      handler: async (batch) => {
        for (const r of batch.records) if (r.kind === 'event') seen.push(`${r.lsn}:${r.seq}`);
      },
    });
    // Until the group has committed the last event: then whatever it skipped is skipped for good.
    await waitFor(
      async () =>
        (
          await sql.query(
            `SELECT 1 FROM cdc_consumer_offsets WHERE consumer = 'api' AND (lsn, seq) = ('A/0', 1)`,
          )
        ).rows.length === 1,
      { what: 'the group to commit the last event', timeoutMs: 30_000 },
    );
    await consumer.stop();
    expect(seen).toEqual(expected);
  });

  it('philotes_read and philotes_commit, one event at a time, take the same order', async () => {
    await sql.query(`SELECT philotes_create_consumer('sql')`);
    const seen: string[] = [];
    for (let i = 0; i <= expected.length; i++) {
      const rows = (
        await sql.query<{ lsn: string; seq: number }>(
          `SELECT lsn::text, seq FROM philotes_read('sql', 'x', 1)`,
        )
      ).rows;
      if (rows.length === 0) break;
      seen.push(`${rows[0]!.lsn}:${rows[0]!.seq}`);
      await sql.query(`SELECT philotes_commit('sql', 'x', $1::pg_lsn, $2)`, [
        rows[0]!.lsn,
        rows[0]!.seq,
      ]);
    }
    expect(seen).toEqual(expected);
  });
});
