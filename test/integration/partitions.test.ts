/**
 * Partitioned tables: the publication Philotes creates publishes them as their root table by
 * default (publish_via_partition_root), so events and the schema history name the table a
 * consumer queries, and rows that move between partitions stay one table's history; with
 * partitionRoot: false each event names the partition its row is in.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/cluster.js';
import { connect, waitForSlotActive } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const DDL = `
  CREATE TABLE measurements (id int, at date, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
  CREATE TABLE m2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
  CREATE TABLE m2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');`;

const CHANGES = `
  INSERT INTO measurements VALUES (1, '2025-03-01', 'a'), (2, '2026-03-01', 'b'), (3, '2025-06-01', 'c');
  UPDATE measurements SET v = 'b2' WHERE id = 2;
  UPDATE measurements SET at = '2026-06-01' WHERE id = 3;  -- moves to the other partition
  DELETE FROM measurements WHERE id = 1;`;

/**
 * Starts Philotes from a file with two sources on `source`, one per database named like it: the
 * first via the root, the second (`byPartition`) with partitionRoot: false.
 */
function startPartitionFleet(
  source: Cluster,
  buffer: Cluster,
  dir: string,
  defaults: string,
  [viaRoot, byPartition]: [string, string],
): PhilotesProcess {
  const config = join(dir, 'fleet.yaml');
  const entry = (id: string, extra: string) =>
    `  - { id: ${id}, host: ${source.host}, port: ${source.port}, database: ${id}, user: ${source.user}, passwordEnv: SOURCE_PASSWORD, slot: philotes_${id}${extra} }`;
  writeFileSync(
    config,
    [
      `buffer: { host: ${buffer.host}, port: ${buffer.port}, database: buffer, user: ${buffer.user}, passwordEnv: BUFFER_PASSWORD }`,
      `defaults: ${defaults}`,
      'sources:',
      entry(viaRoot, ''),
      entry(byPartition, ', partitionRoot: false'),
    ].join('\n'),
  );
  return startPhilotes(
    {
      BUFFER_PASSWORD: buffer.password,
      SOURCE_PASSWORD: source.password,
      PHILOTES_METRICS_PORT: '0',
    },
    { args: ['--config', config] },
  );
}

describe('partitioned tables', () => {
  let source: Cluster;
  let buffer: Cluster;
  let dir: string;
  let philotes: PhilotesProcess | undefined;

  beforeAll(async () => {
    [source, buffer] = await Promise.all([startCluster(), startCluster()]);
    await buffer.createDatabase('buffer');
    for (const db of ['viaroot', 'bypartition']) {
      await source.createDatabase(db);
      await source.query(DDL, [], db);
    }
    dir = mkdtempSync(join(tmpdir(), 'philotes-partitions-'));
    philotes = startPartitionFleet(source, buffer, dir, '{ snapshot: never }', [
      'viaroot',
      'bypartition',
    ]);
    await waitForSlotActive(source, 'philotes_viaroot');
    await waitForSlotActive(source, 'philotes_bypartition');
    for (const db of ['viaroot', 'bypartition']) await source.query(CHANGES, [], db);
  });

  afterAll(async () => {
    await philotes?.kill9();
    await Promise.allSettled([source?.destroy(), buffer?.destroy()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  async function events(sourceId: string): Promise<string[]> {
    const rows = await waitFor(
      async () => {
        const found = await buffer.query<{ e: string }>(
          `SELECT operation || ' ' || table_name || ' ' || coalesce(after->>'id', before->>'id') AS e
             FROM cdc_events WHERE source_id = $1 ORDER BY cdc_events.lsn, seq`,
          [sourceId],
          'buffer',
        );
        return found.length >= 7 ? found : false;
      },
      { what: `the events of ${sourceId}`, timeoutMs: 30_000 },
    );
    return rows.map((r) => r.e);
  }

  it('by default, every event names the root table, and a row that moves stays in its history', async () => {
    expect(await events('viaroot')).toEqual([
      'INSERT measurements 1',
      'INSERT measurements 2',
      'INSERT measurements 3',
      'UPDATE measurements 2',
      // Moving between partitions is a delete from one and an insert into the other.
      'DELETE measurements 3',
      'INSERT measurements 3',
      'DELETE measurements 1',
    ]);
    const history = await buffer.query<{ table_name: string; primary_key: string[] }>(
      `SELECT table_name, primary_key FROM cdc_schema_history WHERE source_id = 'viaroot'`,
      [],
      'buffer',
    );
    expect(history).toEqual([{ table_name: 'measurements', primary_key: ['id', 'at'] }]);
  });

  it('with partitionRoot: false, each event names the partition its row is in', async () => {
    expect(await events('bypartition')).toEqual([
      'INSERT m2025 1',
      'INSERT m2026 2',
      'INSERT m2025 3',
      'UPDATE m2026 2',
      'DELETE m2025 3',
      'INSERT m2026 3',
      'DELETE m2025 1',
    ]);
  });
});

describe('partitioned tables: the initial snapshot', () => {
  let source: Cluster;
  let buffer: Cluster;
  let dir: string;
  let philotes: PhilotesProcess | undefined;
  const ROWS = 12_000;

  beforeAll(async () => {
    [source, buffer] = await Promise.all([startCluster(), startCluster()]);
    await buffer.createDatabase('buffer');
    for (const db of ['snaproot', 'snapparts']) {
      await source.createDatabase(db);
      await source.query(DDL, [], db);
      // Existing rows in both partitions, before Philotes starts.
      await source.query(
        `INSERT INTO measurements
         SELECT g, date '2025-01-01' + (g % 700), 'old ' || g FROM generate_series(1, ${ROWS}) g`,
        [],
        db,
      );
    }
    dir = mkdtempSync(join(tmpdir(), 'philotes-partitions-snapshot-'));
    philotes = startPartitionFleet(
      source,
      buffer,
      dir,
      '{ snapshot: initial, snapshotChunkRows: 100 }',
      ['snaproot', 'snapparts'],
    );
  });

  afterAll(async () => {
    await philotes?.kill9();
    await Promise.allSettled([source?.destroy(), buffer?.destroy()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** The buffer replayed per table name, keyed by (id, at): the last event of each key. */
  async function replay(sourceId: string): Promise<Map<string, string>> {
    const rows = await buffer.query<{ k: string; v: string }>(
      `SELECT table_name || ' ' || k AS k, v FROM (
         SELECT DISTINCT ON (table_name, coalesce(after, before)->>'id', coalesce(after, before)->>'at')
                table_name, operation,
                (coalesce(after, before)->>'id') || '/' || (coalesce(after, before)->>'at') AS k,
                after->>'v' AS v
           FROM cdc_events WHERE source_id = $1
          ORDER BY table_name, coalesce(after, before)->>'id', coalesce(after, before)->>'at',
                   lsn DESC, seq DESC) last
        WHERE operation <> 'DELETE'`,
      [sourceId],
      'buffer',
    );
    return new Map(rows.map((r) => [r.k, r.v]));
  }

  async function table(db: string, name: string, asTable = name): Promise<Map<string, string>> {
    const rows = await source.query<{ k: string; v: string }>(
      `SELECT '${asTable} ' || id || '/' || at AS k, v FROM ${name}`,
      [],
      db,
    );
    return new Map(rows.map((r) => [r.k, r.v]));
  }

  it('copies the root table, or each partition, while rows change and move between partitions', async () => {
    await waitForSlotActive(source, 'philotes_snaproot');
    await waitForSlotActive(source, 'philotes_snapparts');
    // Writers change and move rows until both copies are done.
    let stop = false;
    const writers = ['snaproot', 'snapparts'].map(async (db) => {
      const c = await connect(source, db);
      for (let i = 1; !stop; i++) {
        await c.query(`UPDATE measurements SET v = 'new ' || $1 WHERE id = $2`, [
          i,
          1 + ((i * 7919) % ROWS),
        ]);
        // Into the other partition (2025 <-> 2026), keeping the key unique.
        await c.query(
          `UPDATE measurements SET at = CASE WHEN at < '2026-01-01' THEN at + 365 ELSE at - 365 END
            WHERE id = $1`,
          [1 + ((i * 104729) % ROWS)],
        );
      }
      await c.end();
    });
    await waitFor(
      async () =>
        (
          await buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_snapshots WHERE state = 'done'`,
            [],
            'buffer',
          )
        )[0]!.n === 2,
      { what: 'both snapshots to finish', timeoutMs: 60_000 },
    );
    stop = true;
    await Promise.all(writers);
    for (const db of ['snaproot', 'snapparts'])
      await source.query(`INSERT INTO measurements VALUES (0, '2025-01-01', 'marker')`, [], db);
    await waitFor(
      async () =>
        (
          await buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE after->>'v' = 'marker'`,
            [],
            'buffer',
          )
        )[0]!.n === 2,
      { what: 'the markers', timeoutMs: 60_000 },
    );

    // Via the root: one table, named as the consumer queries it.
    expect(await replay('snaproot')).toEqual(await table('snaproot', 'measurements'));
    // By partition: each partition's rows under its own name, none under the root's.
    const parts = new Map([
      ...(await table('snapparts', 'm2025')),
      ...(await table('snapparts', 'm2026')),
    ]);
    expect(await replay('snapparts')).toEqual(parts);
    const copied = await buffer.query<{ source_id: string; tables: string[] }>(
      `SELECT s.source_id, array_agg(t.table_name ORDER BY t.table_name) AS tables
         FROM cdc_snapshot_tables t JOIN cdc_snapshots s ON s.id = t.snapshot_id
        GROUP BY 1 ORDER BY 1`,
      [],
      'buffer',
    );
    expect(copied).toEqual([
      { source_id: 'snapparts', tables: ['m2025', 'm2026'] },
      { source_id: 'snaproot', tables: ['measurements'] },
    ]);
  });
});
