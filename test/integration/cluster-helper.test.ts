import pg from 'pg';
import { afterAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/cluster.js';

describe('cluster helper', () => {
  const clusters: Cluster[] = [];
  afterAll(async () => {
    await Promise.all(clusters.map((c) => c.destroy()));
  });

  it('starts a logical cluster that survives stop, start and an immediate restart', async () => {
    const c = await startCluster();
    clusters.push(c);

    expect(await c.query('SHOW wal_level')).toEqual([{ wal_level: 'logical' }]);
    expect(c.url()).toBe(`postgres://postgres:${c.password}@127.0.0.1:${c.port}/postgres`);

    await c.createDatabase('helper_smoke');
    await c.query('CREATE TABLE t (id int PRIMARY KEY)', [], 'helper_smoke');
    await c.query('INSERT INTO t VALUES ($1), ($2)', [1, 2], 'helper_smoke');

    await c.stop('fast');
    await expect(c.query('SELECT 1')).rejects.toThrow();
    await c.start();
    await c.restart('immediate');

    const rows = await c.query<{ n: string }>('SELECT count(*) AS n FROM t', [], 'helper_smoke');
    expect(rows).toEqual([{ n: '2' }]);

    // A walsender connection over TCP with the password: what the worker will open. It matches
    // only pg_hba 'replication' lines.
    // `replication` is a real pg option that @types/pg does not declare.
    const replConfig: pg.ClientConfig & { replication: 'database' } = {
      connectionString: c.url('helper_smoke'),
      replication: 'database',
    };
    const repl = new pg.Client(replConfig);
    await repl.connect();
    try {
      const created = await repl.query('CREATE_REPLICATION_SLOT smoke LOGICAL pgoutput');
      expect(created.rows[0]).toMatchObject({ slot_name: 'smoke' });
    } finally {
      await repl.end();
    }
    expect(await c.query('SELECT slot_name FROM pg_replication_slots')).toEqual([
      { slot_name: 'smoke' },
    ]);

    await c.destroy();
    await expect(c.query('SELECT 1')).rejects.toThrow();
  });

  it('rejects a wrong password over TCP', async () => {
    const c = await startCluster();
    clusters.push(c);
    const client = new pg.Client({ connectionString: c.url().replace(c.password, 'wrong') });
    await expect(client.connect()).rejects.toThrow(/password authentication failed/);
  });

  it('starts a replica-level cluster with extra settings', async () => {
    const c = await startCluster({ walLevel: 'replica', settings: { work_mem: '8MB' } });
    clusters.push(c);
    expect(await c.query('SHOW wal_level')).toEqual([{ wal_level: 'replica' }]);
    expect(await c.query('SHOW work_mem')).toEqual([{ work_mem: '8MB' }]);
  });
});
