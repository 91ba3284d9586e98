/**
 * The publication Philotes creates, refuses to create, or finds: it never publishes a table whose
 * UPDATE/DELETE would then fail on the source, captures only PHILOTES_CDC_TABLES when set, uses a
 * publication the user made as it is, and says plainly when the source user lacks the privileges.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
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

  it('(a) a table without a primary key: FOR ALL TABLES as the issue asks, and its inserts are captured', async () => {
    // PostgreSQL rejects UPDATE/DELETE on such a table once published (Philotes warns about it at
    // start); insert-only tables like pgbench_history are the common case and must just work.
    const philotes = startPhilotes(f.env());
    try {
      await waitForSlotActive(f.source);
      const [publication] = await publications('app');
      expect(publication?.puballtables).toBe(true);
      expect([...(publication?.tables ?? [])].sort()).toEqual(['public.bad', 'public.good']);
      await f.source.query(`INSERT INTO bad VALUES ('inserted')`, [], 'app');
      await waitForCatchUp(f, 60_000);
      const events = await readEvents(f.buffer);
      expect(events.map((e) => [e.table_name, e.operation, e.after, e.primary_key])).toEqual([
        ['bad', 'INSERT', { v: 'inserted' }, []],
      ]);
    } finally {
      philotes.signal('SIGTERM');
      const exit = await waitFor(() => philotes.exited, {
        what: 'philotes to exit after SIGTERM',
        timeoutMs: 30_000,
      });
      expect(exit, philotes.stderr.join('\n')).toEqual({ code: 0, signal: null });
    }
    // A clean slate for the next case.
    await f.source.query(
      `SELECT pg_drop_replication_slot('philotes_cdc'); DROP PUBLICATION philotes_pub;`,
      [],
      'app',
    );
    await f.buffer.query(
      'DELETE FROM cdc_events; DELETE FROM cdc_checkpoints; DELETE FROM cdc_schema_history;',
      [],
      'buffer',
    );
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
    beforeAll(async () => {
      // (b)'s slot belongs to database app; these tests use the default slot name elsewhere.
      await waitFor(
        async () =>
          (
            await f.source.query<{ active: boolean }>(
              `SELECT active FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
            )
          )[0]?.active === false,
        { what: 'the slot of (b) to be released' },
      );
      await f.source.query(`SELECT pg_drop_replication_slot('philotes_cdc')`);
    });

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
