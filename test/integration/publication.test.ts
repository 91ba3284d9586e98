/**
 * The publication Philotes creates, refuses to create, or finds: it never publishes a table whose
 * UPDATE/DELETE would then fail on the source, captures only PHILOTES_CDC_TABLES when set, uses a
 * publication the user made as it is, and says plainly when the source user lacks the privileges.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  readEvents,
  startFixture,
  waitForCatchUp,
  waitForSlotActive,
  type Fixture,
} from '../support/fixture.js';
import { runUntilSourceFails, startPhilotes, type FailedSourceRun } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

/**
 * The source failed for good: exactly one stderr line "philotes: source ...: ...", which is
 * returned, while the process stayed up (a failed source is retried slowly) until SIGTERM.
 */
function expectFailedSource(run: FailedSourceRun): string {
  const context = `exit ${run.code} signal ${run.signal}\nstderr:\n${run.stderr.join('\n')}\nstdout tail:\n${run.stdout.slice(-10).join('\n')}`;
  expect(run.stillRunning, context).toBe(true);
  expect(run.code, context).toBe(0);
  expect(run.stderr, context).toHaveLength(1);
  const line = run.stderr[0]!;
  expect(line, context).toMatch(/^philotes: source "[^"]+": \S/);
  return line;
}

describe('publication', () => {
  let f: Fixture;

  const publications = (database: string) =>
    f.source.query<{ pubname: string; puballtables: boolean; tables: string[] | null }>(
      `SELECT p.pubname, p.puballtables,
              (SELECT array_agg(schemaname || '.' || tablename ORDER BY 1) FROM pg_publication_tables t
                WHERE t.pubname = p.pubname) AS tables
         FROM pg_publication p ORDER BY 1`,
      [],
      database,
    );
  const slots = () =>
    f.source.query<{ slot_name: string; database: string }>(
      'SELECT slot_name, database FROM pg_replication_slots ORDER BY 1',
    );

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query(
      `CREATE TABLE good (id int PRIMARY KEY, v text);
       CREATE TABLE bad (v text);
       INSERT INTO bad VALUES ('x'), ('gone');`,
      [],
      'app',
    );
  });

  afterAll(async () => {
    await f?.destroy();
  });

  /** Drops what a case left on the source and in the buffer, for the next one. */
  async function cleanSlate(): Promise<void> {
    // The default slot, of whichever database the case before used: released by its walsender
    // (which may outlive the stopped Philotes by a moment), then dropped.
    await waitFor(
      async () =>
        (
          await f.source.query<{ active: boolean }>(
            `SELECT active FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
          )
        )[0]?.active !== true,
      { what: 'the default slot to be released' },
    );
    await f.source.query(
      `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
    );
    await f.source.query(
      `DROP PUBLICATION IF EXISTS philotes_pub;
       -- The tables as beforeAll made them: bad without a key or identity, no new tables.
       ALTER TABLE bad DROP COLUMN IF EXISTS id;
       ALTER TABLE bad REPLICA IDENTITY DEFAULT;
       DROP TABLE IF EXISTS late, late_nokey;`,
      [],
      'app',
    );
    // The buffer's tables exist once a first case has started Philotes.
    await f.buffer.query(
      `DO $$ BEGIN
         IF to_regclass('cdc_events') IS NOT NULL THEN
           DELETE FROM cdc_events; DELETE FROM cdc_checkpoints; DELETE FROM cdc_schema_history;
           DELETE FROM cdc_snapshot_tables; DELETE FROM cdc_snapshots;
         END IF;
       END $$;`,
      [],
      'buffer',
    );
  }

  async function stop(philotes: ReturnType<typeof startPhilotes>): Promise<void> {
    philotes.signal('SIGTERM');
    const exit = await waitFor(() => philotes.exited, {
      what: 'philotes to exit after SIGTERM',
      timeoutMs: 30_000,
    });
    expect(exit, philotes.stderr.join('\n')).toEqual({ code: 0, signal: null });
  }

  /** The application's write on the keyless table: null when the source took it, else its error. */
  const appUpdate = (table = 'bad'): Promise<string | null> =>
    f.source
      .query(`UPDATE ${table} SET v = v`, [], 'app')
      .then(() => null)
      .catch((error: unknown) => (error as Error).message);

  /** Each key's last image, replaying the table's events in (lsn, seq) order. */
  async function replayed(table: string): Promise<Array<Record<string, unknown>>> {
    const rows = new Map<string, Record<string, unknown>>();
    for (const e of await readEvents(f.buffer, 'app', table)) {
      const image = (e.after ?? e.before)!;
      if (e.operation === 'DELETE') rows.delete(String(image['id']));
      else rows.set(String(image['id']), e.after!);
    }
    return [...rows.values()].sort((x, y) => Number(x['id']) - Number(y['id']));
  }
  const sourceRows = (table: string) =>
    f.source.query<Record<string, unknown>>(`SELECT * FROM ${table} ORDER BY id`, [], 'app');

  // Each case starts from database app's tables with no slot, no publication and an empty
  // buffer, whichever ran before it.
  beforeEach(async () => {
    await cleanSlate();
  });

  it('(a) keylessTables: block (the default): no publication over a keyless table, and the application keeps writing', async () => {
    expect(await appUpdate()).toBeNull();
    const run = await runUntilSourceFails(f.env());
    const line = expectFailedSource(run);
    expect(line).toContain('public.bad');
    expect(line).toContain('keylessTables');
    expect(await publications('app')).toEqual([]);
    expect((await slots()).map((s) => s.slot_name)).not.toContain('philotes_cdc');
    expect(await appUpdate()).toBeNull();
  });

  it('(a2) keylessTables: accept: FOR ALL TABLES, the inserts captured, and the updates fail as said', async () => {
    // Insert-only tables such as pgbench_history: the user accepts what PostgreSQL then refuses.
    const philotes = startPhilotes(f.env({ PHILOTES_CDC_KEYLESS_TABLES: 'accept' }));
    try {
      await waitForSlotActive(f.source);
      const [publication] = await publications('app');
      expect(publication?.puballtables).toBe(true);
      expect([...(publication?.tables ?? [])].sort()).toEqual(['public.bad', 'public.good']);
      expect(await appUpdate()).toMatch(/does not have a replica identity/);
      await f.source.query(`INSERT INTO bad VALUES ('inserted')`, [], 'app');
      await waitForCatchUp(f, 60_000);
      const events = (await readEvents(f.buffer, 'app')).filter((e) => e.operation !== 'SNAPSHOT');
      expect(events.map((e) => [e.table_name, e.operation, e.after, e.primary_key])).toEqual([
        ['bad', 'INSERT', { v: 'inserted' }, []],
      ]);
    } finally {
      await stop(philotes);
    }
    await cleanSlate();
  });

  it('(a3) keylessTables: identity_full: the table gets REPLICA IDENTITY FULL, its updates work and carry the old row', async () => {
    const philotes = startPhilotes(f.env({ PHILOTES_CDC_KEYLESS_TABLES: 'identity_full' }));
    try {
      await waitForSlotActive(f.source);
      const [ident] = await f.source.query<{ relreplident: string }>(
        `SELECT relreplident FROM pg_class WHERE oid = 'bad'::regclass`,
        [],
        'app',
      );
      expect(ident?.relreplident).toBe('f');
      await f.source.query(
        `INSERT INTO bad VALUES ('a3'); UPDATE bad SET v = 'full' WHERE v = 'a3'`,
        [],
        'app',
      );
      await waitForCatchUp(f, 60_000);
      const updates = (await readEvents(f.buffer, 'app', 'bad')).filter(
        (e) => e.operation === 'UPDATE',
      );
      expect(updates.map((e) => [e.before, e.after])).toEqual([[{ v: 'a3' }, { v: 'full' }]]);
    } finally {
      await stop(philotes);
    }
    await f.source.query(`ALTER TABLE bad REPLICA IDENTITY DEFAULT`, [], 'app');
    await cleanSlate();
  });

  it('(a4) keylessTables: leave_out: the others published, kept current, every new table exact from its first row', async () => {
    const philotes = startPhilotes(f.env({ PHILOTES_CDC_KEYLESS_TABLES: 'leave_out' }));
    try {
      await waitForSlotActive(f.source);
      expect(await publications('app')).toEqual([
        { pubname: 'philotes_pub', puballtables: false, tables: ['public.good'] },
      ]);
      expect(await appUpdate()).toBeNull();

      // While Philotes runs: a new keyed table written to before it can have joined, a new
      // keyless one, and the keyless table given a key.
      await f.source.query(
        `CREATE TABLE late (id int PRIMARY KEY, v text);
         INSERT INTO late VALUES (1, 'before'), (2, 'before'), (4, 'only in the snapshot');
         CREATE TABLE late_nokey (v text);
         INSERT INTO late_nokey VALUES ('n');
         ALTER TABLE bad ADD COLUMN id serial PRIMARY KEY;`,
        [],
        'app',
      );
      expect(await appUpdate('late_nokey')).toBeNull();
      await waitFor(
        async () =>
          [...((await publications('app'))[0]?.tables ?? [])].sort().join() ===
          'public.bad,public.good,public.late',
        { what: 'the new and the newly keyed table to join the publication', timeoutMs: 90_000 },
      );
      await f.source.query(
        `INSERT INTO late VALUES (3, 'after');
         UPDATE late SET v = 'after' WHERE id = 1;
         DELETE FROM late WHERE id = 2;
         UPDATE bad SET v = 'keyed' WHERE v = 'gone';`,
        [],
        'app',
      );
      await waitFor(
        async () =>
          (
            await f.buffer.query<{ n: number }>(
              `SELECT count(*)::int AS n FROM cdc_snapshots
                WHERE source_id = 'app' AND reason = 'on_demand' AND state = 'done'`,
              [],
              'buffer',
            )
          )[0]?.n === 1,
        { what: 'the snapshot of the joined tables to finish', timeoutMs: 90_000 },
      );
      await waitForCatchUp(f, 60_000);
      expect(await replayed('late')).toEqual(await sourceRows('late'));
      expect(await replayed('bad')).toEqual(await sourceRows('bad'));
      expect(await readEvents(f.buffer, 'app', 'late_nokey')).toEqual([]);
      expect(await appUpdate('late_nokey')).toBeNull();

      // A published table that loses its key: its writes fail until the keeper drops it.
      await f.source.query(`ALTER TABLE late DROP CONSTRAINT late_pkey`, [], 'app');
      await waitFor(async () => (await appUpdate('late')) === null, {
        what: 'the keyless table to leave the publication, so that its writes work again',
        timeoutMs: 90_000,
      });
      expect([...((await publications('app'))[0]?.tables ?? [])].sort()).toEqual([
        'public.bad',
        'public.good',
      ]);
    } finally {
      await stop(philotes);
    }
    await cleanSlate();
  });

  it('(b) PHILOTES_CDC_TABLES=public.good: a FOR TABLE publication, and only that table is captured', async () => {
    const philotes = startPhilotes(f.env({ PHILOTES_CDC_TABLES: 'public.good' }));
    try {
      await waitForSlotActive(f.source);
      expect(await publications('app')).toEqual([
        { pubname: 'philotes_pub', puballtables: false, tables: ['public.good'] },
      ]);

      await f.source.query(
        `BEGIN;
         INSERT INTO good VALUES (1, 'one');
         INSERT INTO bad VALUES ('not captured');
         UPDATE bad SET v = 'still not captured';
         UPDATE good SET v = 'uno' WHERE id = 1;
         COMMIT;
         DELETE FROM bad;
         INSERT INTO good VALUES (2, 'two');`,
        [],
        'app',
      );
      await waitForCatchUp(f, 60_000);

      const events = await readEvents(f.buffer);
      expect(events.map((e) => [e.table_name, e.operation, e.after])).toEqual([
        ['good', 'INSERT', { id: 1, v: 'one' }],
        ['good', 'UPDATE', { id: 1, v: 'uno' }],
        ['good', 'INSERT', { id: 2, v: 'two' }],
      ]);
    } finally {
      philotes.signal('SIGTERM');
      const exit = await waitFor(() => philotes.exited, {
        what: 'philotes to exit after SIGTERM',
        timeoutMs: 30_000,
      });
      expect(exit, philotes.stderr.join('\n')).toEqual({ code: 0, signal: null });
    }
  });

  describe('in a database of its own', () => {
    it('(c) a publication the user created beforehand is used as is', async () => {
      await f.source.createDatabase('own_pub');
      await f.source.query(
        `CREATE TABLE x (id int PRIMARY KEY, v text);
         CREATE TABLE y (id int PRIMARY KEY, v text);
         CREATE TABLE nokey (v text);
         CREATE PUBLICATION philotes_pub FOR TABLE x WITH (publish = 'insert, update, delete');`,
        [],
        'own_pub',
      );
      const [{ oid: pubOid } = { oid: '' }] = await f.source.query<{ oid: string }>(
        `SELECT oid::text FROM pg_publication WHERE pubname = 'philotes_pub'`,
        [],
        'own_pub',
      );
      const philotes = startPhilotes(
        f.env({ PHILOTES_CDC_SOURCE_DATABASE: 'own_pub', PHILOTES_CDC_SOURCE_ID: 'own' }),
      );
      try {
        await waitForSlotActive(f.source);
        await philotes.waitForLog((l) => l['msg'] === 'publication exists', 10_000);

        await f.source.query(
          `INSERT INTO x VALUES (1, 'x1');
           INSERT INTO y VALUES (1, 'y1');
           INSERT INTO nokey VALUES ('n');
           UPDATE nokey SET v = 'still works';
           UPDATE x SET v = 'x1b';
           DELETE FROM x;
           TRUNCATE y;`,
          [],
          'own_pub',
        );
        await waitForCatchUp(f, 60_000);

        const events = await readEvents(f.buffer, 'own');
        expect(events.map((e) => [e.table_name, e.operation, e.after ?? e.before])).toEqual([
          ['x', 'INSERT', { id: 1, v: 'x1' }],
          ['x', 'UPDATE', { id: 1, v: 'x1b' }],
          ['x', 'DELETE', { id: 1 }],
        ]);
        // Untouched: same publication (not dropped and re-created), same table, same options.
        const [pub] = await f.source.query<Record<string, unknown>>(
          `SELECT oid::text, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate
             FROM pg_publication WHERE pubname = 'philotes_pub'`,
          [],
          'own_pub',
        );
        expect(pub).toEqual({
          oid: pubOid,
          puballtables: false,
          pubinsert: true,
          pubupdate: true,
          pubdelete: true,
          pubtruncate: false,
        });
        expect((await publications('own_pub'))[0]?.tables).toEqual(['public.x']);
      } finally {
        philotes.signal('SIGTERM');
        await philotes.exited;
      }
    });

    describe('(d) a source user without the REPLICATION attribute, not a superuser', () => {
      const USER = 'app_user';
      const PASSWORD = 'app-user-pw-Q7';
      const asAppUser = (database: string, slot: string): Record<string, string> =>
        f.env({
          PHILOTES_CDC_SOURCE_USER: USER,
          PHILOTES_CDC_SOURCE_PASSWORD: PASSWORD,
          PHILOTES_CDC_SOURCE_DATABASE: database,
          PHILOTES_CDC_REPLICATION_SLOT: slot,
        });

      beforeAll(async () => {
        await f.source.query(
          `CREATE ROLE ${USER} LOGIN NOSUPERUSER NOREPLICATION PASSWORD '${PASSWORD}'`,
        );
        for (const db of ['noreplication', 'noreplication_nopub']) {
          await f.source.createDatabase(db);
          await f.source.query(
            `CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO ${USER};`,
            [],
            db,
          );
        }
        // A superuser prepared the publication, as the README suggests: what remains is the slot.
        await f.source.query('CREATE PUBLICATION philotes_pub FOR TABLE t', [], 'noreplication');
      });

      it('publication in place: failed, one line about the REPLICATION attribute, no slot', async () => {
        const run = await runUntilSourceFails(asAppUser('noreplication', 'no_repl'));
        const line = expectFailedSource(run);
        expect(line).toContain('REPLICATION');
        expect(line).toContain('no_repl');
        expect([...run.stdout, ...run.stderr].join('\n')).not.toContain(PASSWORD);
        expect((await slots()).map((s) => s.slot_name)).not.toContain('no_repl');
      });

      it('no publication yet: failed, one line about the missing privilege', async () => {
        const run = await runUntilSourceFails(asAppUser('noreplication_nopub', 'no_repl_nopub'));
        const line = expectFailedSource(run);
        expect(line).toMatch(/superuser|privilege|REPLICATION/);
        expect([...run.stdout, ...run.stderr].join('\n')).not.toContain(PASSWORD);
        expect((await slots()).map((s) => s.slot_name)).not.toContain('no_repl_nopub');
        expect(await publications('noreplication_nopub')).toEqual([]);
      });

      // Checked up front, before the publication: the remedy named is the one that is needed.
      it('no publication yet: the line names the missing REPLICATION attribute first', async () => {
        const run = await runUntilSourceFails(asAppUser('noreplication_nopub', 'no_repl_nopub'));
        expect(expectFailedSource(run)).toContain('REPLICATION');
      });
    });
  });
});
