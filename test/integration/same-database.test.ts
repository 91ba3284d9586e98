/**
 * A user points source and buffer at the same database. The FOR ALL TABLES publication then
 * covers cdc_events itself: without care, every stored event would come back as a change to
 * store, for ever. Philotes must capture the application's tables only, and go quiet when they do.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/cluster.js';
import {
  assertReplayMatchesSource,
  checkItemHistories,
  ITEMS_DDL,
  readEvents,
  startLoad,
  waitForSlotActive,
} from '../support/fixture.js';
import { sampleFor } from '../support/faults.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('source and buffer in one database', () => {
  let cluster: Cluster;
  let philotes: PhilotesProcess | undefined;

  beforeAll(async () => {
    // Every transaction beyond 64 kB of changes is streamed while in progress: staged rows are
    // written to this same database too, and must not come back either.
    cluster = await startCluster({ settings: { logical_decoding_work_mem: '64kB' } });
    await cluster.createDatabase('app');
    await cluster.query(ITEMS_DDL, [], 'app');
  });

  afterAll(async () => {
    philotes?.signal('SIGTERM');
    await philotes?.exited;
    await cluster?.destroy();
  });

  it('captures the application tables exactly once and never its own', async () => {
    philotes = startPhilotes({
      PHILOTES_CDC_SOURCE_URL: cluster.url('app'),
      PHILOTES_BUFFER_URL: cluster.url('app'),
      PHILOTES_CDC_SOURCE_ID: 'app',
      PHILOTES_METRICS_PORT: '0',
      PHILOTES_CDC_CHECKPOINT_INTERVAL: '1s',
    });
    await waitForSlotActive(cluster);
    const load = startLoad(cluster, { clients: 2, maxTransactions: 100 });
    await load.finished();
    await cluster.query(
      `INSERT INTO items (client, name) SELECT 99, 'bulk ' || g FROM generate_series(1, 20000) g`,
      [],
      'app',
    );

    // The buffer is this same database: fixture helpers read it under the name 'buffer'.
    const asBuffer: Cluster = {
      ...cluster,
      query: (sql, params) => cluster.query(sql, params, 'app'),
    };
    const [{ n: items }] = (await cluster.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM items',
      [],
      'app',
    )) as [{ n: number }];
    await waitFor(
      async () => {
        const rows = checkItemHistories(await readEvents(asBuffer));
        return rows.size === items ? rows : undefined;
      },
      { what: 'every item to be stored', timeoutMs: 60_000 },
    );
    const events = await readEvents(asBuffer);
    expect(new Set(events.map((e) => e.table_name))).toEqual(new Set(['items']));
    await assertReplayMatchesSource(cluster, checkItemHistories(events));

    // Quiet once caught up: no feedback loop storing its own writes.
    const settled = await cluster.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM cdc_events',
      [],
      'app',
    );
    const [before] = await cluster.query<{ lsn: string }>(
      'SELECT lsn FROM cdc_checkpoints',
      [],
      'app',
    );
    await sampleFor(3_000, 'the buffer to stay as it is', async () => {
      const [now] = await cluster.query<{ n: number }>(
        'SELECT count(*)::int AS n FROM cdc_events',
        [],
        'app',
      );
      const [checkpoint] = await cluster.query<{ lsn: string }>(
        'SELECT lsn FROM cdc_checkpoints',
        [],
        'app',
      );
      expect(now!.n).toBe(settled[0]!.n);
      expect(checkpoint!.lsn).toBe(before!.lsn);
    });
  });
});
