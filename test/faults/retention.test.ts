/**
 * Partitions and retention under load (src/buffer/partitions.ts), with intervals of seconds so
 * that days pass in a minute: the buffer is converted to partitions at start, partitions roll
 * over while the load writes and the capture stores, old ones are dropped once every group has
 * read them; a group that reads nothing holds them until retentionMax, and is then expired
 * loudly (its reads refused). A consumer that keeps up mirrors the source exactly throughout,
 * and no capture transaction waited on maintenance longer than the bound its locks allow.
 */
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { consume, type ConsumedRecord, type Consumer } from '../../src/index.js';
import { createLogger } from '../../src/common/logger.js';
import {
  connect,
  ITEMS_DDL,
  startFixture,
  startLoad,
  waitForCatchUp,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { freePort } from '../support/ports.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

describe('partitions and retention under load', () => {
  let f: Fixture;
  let philotes: PhilotesProcess | undefined;
  let consumer: Consumer | undefined;
  let metricsPort: number;

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(ITEMS_DDL, [], 'app');
    metricsPort = await freePort();
  });

  afterAll(async () => {
    await consumer?.stop();
    await philotes?.kill9();
    await f?.destroy();
  });

  /** The service that keeps up: a mirror of items (id, version), through the batch's transaction. */
  async function mirror(records: readonly ConsumedRecord[], tx: pg.ClientBase): Promise<void> {
    for (const r of records) {
      if (r.kind !== 'event') continue;
      if (r.operation === 'INSERT' || r.operation === 'UPDATE' || r.operation === 'SNAPSHOT')
        await tx.query(
          `INSERT INTO mirror (id, version) VALUES ($1, $2)
           ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version`,
          [r.after!['id'], r.after!['version']],
        );
      else if (r.operation === 'DELETE')
        await tx.query('DELETE FROM mirror WHERE id = $1', [r.before!['id']]);
    }
  }

  async function partitions(): Promise<{ live: number; dropped: number }> {
    const [row] = await f.buffer.query<{ live: number; dropped: number }>(
      `SELECT count(*) FILTER (WHERE dropped_at IS NULL)::int AS live,
              count(*) FILTER (WHERE dropped_at IS NOT NULL)::int AS dropped FROM cdc_partitions`,
      [],
      'buffer',
    );
    return row!;
  }

  it('rolls partitions over, holds them for a lagging group until retentionMax, then expires it', async () => {
    philotes = startPhilotes(
      f.env({
        PHILOTES_PARTITION_INTERVAL: '10s',
        PHILOTES_PARTITIONS_AHEAD: '2',
        PHILOTES_RETENTION: '20s',
        PHILOTES_RETENTION_MAX: '50s',
        PHILOTES_METRICS_PORT: String(metricsPort),
      }),
    );
    await waitForSlotActive(f.source);
    await waitFor(async () => (await partitions().catch(() => ({ live: 0 }))).live >= 3, {
      what: 'cdc_events to be partitioned',
      timeoutMs: 60_000,
    });
    const [kind] = await f.buffer.query<{ kind: string }>(
      `SELECT relkind::text AS kind FROM pg_class WHERE relname = 'cdc_events'`,
      [],
      'buffer',
    );
    expect(kind!.kind).toBe('p');
    await f.buffer.query('CREATE TABLE mirror (id bigint PRIMARY KEY, version int)', [], 'buffer');
    // A group that has begun the source and then reads nothing.
    await f.buffer.query(
      `SELECT philotes_create_consumer('slow');
       INSERT INTO cdc_consumer_offsets (consumer, source_id, lsn, seq) VALUES ('slow', 'app', '0/0', -1)`,
      [],
      'buffer',
    );
    consumer = await consume({
      buffer: f.buffer.url('buffer'),
      group: 'fast',
      pollIntervalMs: 200,
      handler: (batch, tx) => mirror(batch.records, tx),
      logger: createLogger('silent'),
    });
    const load = startLoad(f.source, { clients: 2 });
    try {
      // Past retention (20 s) the slow group holds the partitions: none is dropped.
      await waitFor(
        async () =>
          (
            await f.buffer.query(
              `SELECT 1 FROM cdc_partitions WHERE dropped_at IS NULL AND to_at < now() - interval '25 seconds'`,
              [],
              'buffer',
            )
          ).length > 0,
        { what: 'a partition past retention', timeoutMs: 90_000 },
      );
      expect((await partitions()).dropped).toBe(0);
      // Past retentionMax (50 s): dropped anyway, and the slow group is expired.
      await waitFor(async () => (await partitions()).dropped >= 2, {
        what: 'partitions past retentionMax to be dropped',
        timeoutMs: 120_000,
      });
      const [slow] = await f.buffer.query<{ expired: boolean; reason: string }>(
        `SELECT expired_at IS NOT NULL AS expired, expired_reason AS reason FROM cdc_consumers WHERE name = 'slow'`,
        [],
        'buffer',
      );
      expect(slow).toMatchObject({ expired: true });
      expect(slow!.reason).toMatch(/retentionMax/);
      const client = await connect(f.buffer, 'buffer');
      try {
        await expect(
          client.query(`SELECT * FROM philotes_read('slow', 'app')`),
        ).rejects.toMatchObject({ code: 'PH005' });
      } finally {
        await client.end();
      }
    } finally {
      await load.stop();
    }
    // The group that kept up was never held back nor expired, and mirrors the source exactly.
    await waitForCatchUp(f);
    const digest = `SELECT count(*)::int AS n, coalesce(md5(string_agg(id || ':' || version, ',' ORDER BY id)), '') AS md5`;
    const [want] = await f.source.query<{ n: number; md5: string }>(
      `${digest} FROM items`,
      [],
      'app',
    );
    await waitFor(
      async () => {
        const [have] = await f.buffer.query<{ n: number; md5: string }>(
          `${digest} FROM mirror`,
          [],
          'buffer',
        );
        return have!.md5 === want!.md5 && have!.n === want!.n;
      },
      { what: 'the mirror to equal the source', timeoutMs: 60_000 },
    );
    const [fast] = await f.buffer.query<{ expired: boolean }>(
      `SELECT expired_at IS NOT NULL AS expired FROM cdc_consumers WHERE name = 'fast'`,
      [],
      'buffer',
    );
    expect(fast!.expired).toBe(false);
    // No buffer transaction of the capture waited longer than the maintenance's lock bound (2 s).
    const body = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    const bucket = (le: string) => {
      const line = body
        .split('\n')
        .find(
          (l) =>
            l.startsWith('philotes_buffer_commit_duration_seconds_bucket{') &&
            l.includes('source="app"') &&
            l.includes(`le="${le}"`),
        );
      return line === undefined ? NaN : Number(line.slice(line.lastIndexOf(' ') + 1));
    };
    const slowCommits = bucket('+Inf') - bucket('2.5');
    expect(bucket('+Inf')).toBeGreaterThan(100);
    expect(slowCommits).toBe(0);
    expect(body).toMatch(/^philotes_retention_dropped_total [1-9]/m);
    expect(body).toMatch(/^philotes_consumer_expired\{group="slow"\} 1$/m);
    // The status page lists the groups, the expired one as such.
    const page = await (await fetch(`http://127.0.0.1:${metricsPort}/`)).text();
    expect(page).toMatch(/<tr data-group="slow">.*expired/);
    expect(page).toMatch(/<tr data-group="fast">/);
  });
});
