/**
 * Operator mistakes that make changes undeliverable: the source must stop, loudly, with the gap
 * and the way out, and never go on as if nothing happened. Then `reset-source --accept-gap`
 * records the gap in cdc_gaps and capture resumes after it. And the things that look like a gap
 * but are not (Philotes' own idle confirmations) must not stop anything.
 *
 * Each case is its own source (id, slot, publication, table) on one pair of clusters.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLsn } from '../../src/common/lsn.js';
import { startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { outputTail, waitForExit } from '../support/faults.js';
import {
  linesWithDuplicateKeys,
  runPhilotesToExit,
  runUntilSourceFails,
  startPhilotes,
  type FailedSourceRun,
  type PhilotesProcess,
  type PhilotesRun,
} from '../support/philotes.js';
import { freePort } from '../support/ports.js';
import { waitFor } from '../support/poll.js';

interface Case {
  id: string;
  slot: string;
  table: string;
  env: Record<string, string>;
}

interface GapRow {
  from_lsn: string;
  to_lsn: string;
  reason: string;
  slot_name: string;
  recorded_at: Date;
}

describe('changes that can no longer be delivered', () => {
  let f: Fixture;
  /** Every line every Philotes process printed, for the duplicate-key check at the end. */

  beforeAll(async () => {
    f = await startFixture();
  });

  afterAll(async () => {
    await f?.destroy();
  });

  function makeCase(name: string): Case {
    return {
      id: name,
      slot: `slot_${name}`,
      table: `t_${name}`,
      env: f.env({
        PHILOTES_CDC_SOURCE_ID: name,
        PHILOTES_CDC_REPLICATION_SLOT: `slot_${name}`,
        PHILOTES_CDC_PUBLICATION: `pub_${name}`,
      }),
    };
  }

  const q = <T = Record<string, unknown>>(sql: string, params: unknown[] = []) =>
    f.source.query<T>(sql, params, 'app');
  const b = <T = Record<string, unknown>>(sql: string, params: unknown[] = []) =>
    f.buffer.query<T>(sql, params, 'buffer');

  /** One transaction per row, ids from..to. */
  async function insert(c: Case, from: number, to: number): Promise<void> {
    for (let id = from; id <= to; id++) await q(`INSERT INTO ${c.table} VALUES ($1, 'x')`, [id]);
  }

  async function storedIds(c: Case): Promise<number[]> {
    const rows = await b<{ id: number }>(
      `SELECT (after->>'id')::int AS id FROM cdc_events
        WHERE source_id = $1 AND table_name = $2 AND operation = 'INSERT' ORDER BY lsn, seq`,
      [c.id, c.table],
    );
    return rows.map((r) => r.id);
  }

  async function waitForIds(c: Case, count: number): Promise<number[]> {
    return waitFor(
      async () => {
        const ids = await storedIds(c);
        return ids.length >= count ? ids : false;
      },
      { what: `${count} stored rows of ${c.table}`, timeoutMs: 60_000 },
    );
  }

  async function checkpoint(c: Case): Promise<{ lsn: string; confirmed_lsn: string | null }> {
    const [row] = await b<{ lsn: string; confirmed_lsn: string | null }>(
      'SELECT lsn, confirmed_lsn::text FROM cdc_checkpoints WHERE source_id = $1',
      [c.id],
    );
    return row!;
  }

  /**
   * Where a gap starts for a stopped source: its checkpoint, or the idle position Philotes
   * recorded and confirmed past it at the stop (WAL written elsewhere), whichever is further.
   */
  function gapFrom(cp: { lsn: string; confirmed_lsn: string | null }): string {
    return cp.confirmed_lsn !== null && parseLsn(cp.confirmed_lsn) > parseLsn(cp.lsn)
      ? cp.confirmed_lsn
      : cp.lsn;
  }

  async function slotRow(c: Case): Promise<{ confirmed_flush_lsn: string } | undefined> {
    const [row] = await q<{ confirmed_flush_lsn: string }>(
      'SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1',
      [c.slot],
    );
    return row;
  }

  async function gaps(c: Case): Promise<GapRow[]> {
    return b<GapRow>(
      `SELECT from_lsn::text, to_lsn::text, reason, slot_name, recorded_at
         FROM cdc_gaps WHERE source_id = $1 ORDER BY id`,
      [c.id],
    );
  }

  /** Every log line of every run names each key once: checked in the test that ran it. */
  function keep(run: { stdout: string[]; stderr: string[] }): void {
    const lines = [...run.stdout, ...run.stderr];
    expect(linesWithDuplicateKeys(lines)).toEqual([]);
  }

  async function runToExit(c: Case, args: string[] = []): Promise<PhilotesRun> {
    const run = await runPhilotesToExit(c.env, 60_000, { args });
    keep(run);
    return run;
  }

  /** Starts Philotes on the case and waits until it streams. */
  async function start(c: Case): Promise<PhilotesProcess> {
    const p = startPhilotes(c.env);
    await waitForSlotActive(f.source, c.slot);
    return p;
  }

  async function stop(p: PhilotesProcess): Promise<void> {
    expect(p.signal('SIGTERM')).toBe(true);
    const exit = await waitForExit(p, 30_000);
    keep(p);
    expect(exit, outputTail(p)).toEqual({ code: 0, signal: null });
  }

  /**
   * Runs Philotes on the case until its source fails: it must say so in one stderr line and on
   * /readyz (503, state failed), and stay up (retrying slowly) until SIGTERM.
   */
  async function failedRun(c: Case): Promise<FailedSourceRun> {
    const metricsPort = await freePort();
    const run = await runUntilSourceFails(
      { ...c.env, PHILOTES_METRICS_PORT: String(metricsPort), PHILOTES_METRICS_HOST: '127.0.0.1' },
      { metricsPort },
    );
    keep(run);
    return run;
  }

  /** The line the stopped source printed; checks what /readyz said about it. */
  function expectStopped(run: FailedSourceRun, code?: string): string {
    const context = `exit ${run.code}\nstderr:\n${run.stderr.join('\n')}\nstdout:\n${run.stdout.slice(-8).join('\n')}`;
    expect(run.stillRunning, context).toBe(true);
    expect(run.code, context).toBe(0);
    expect(run.stderr, context).toHaveLength(1);
    expect(run.readiness?.status, context).toBe(503);
    const [source] = (run.readiness?.body['sources'] ?? []) as Array<Record<string, unknown>>;
    expect(source?.['state'], context).toBe('failed');
    if (code !== undefined) expect(source?.['lastErrorCode'], context).toBe(code);
    return run.stderr[0]!;
  }

  async function reset(c: Case, ...flags: string[]): Promise<PhilotesRun> {
    return runToExit(c, ['reset-source', '--source', c.id, ...flags]);
  }

  /**
   * Pushes WAL the stopped slot still needs past a 1 MB max_slot_wal_keep_size until it is lost,
   * committing a row (ids from `firstId`) and a change of row 2 each round; returns the next id.
   */
  async function invalidateSlot(c: Case, firstId: number): Promise<number> {
    await q(`ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'`);
    await q('SELECT pg_reload_conf()');
    let n = firstId;
    try {
      await waitFor(
        async () => {
          await q(`INSERT INTO ${c.table} VALUES ($1, 'during the gap')`, [n]);
          await q(`UPDATE ${c.table} SET v = 'changed in the gap' WHERE id = 2`);
          n++;
          await q('SELECT pg_switch_wal()');
          await q('CHECKPOINT');
          const [row] = await q<{ wal_status: string | null }>(
            'SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1',
            [c.slot],
          );
          return row?.wal_status === 'lost';
        },
        { what: 'the slot to be invalidated', timeoutMs: 60_000, intervalMs: 10 },
      );
    } finally {
      await q('ALTER SYSTEM RESET max_slot_wal_keep_size');
      await q('SELECT pg_reload_conf()');
    }
    return n;
  }

  it('a slot dropped while Philotes was stopped: stops with the gap, never creates a slot silently; reset-source records the gap and capture resumes', async () => {
    const c = makeCase('dropped');
    await q(`CREATE TABLE ${c.table} (id int PRIMARY KEY, v text)`);
    const p = await start(c);
    await insert(c, 1, 10);
    await waitForIds(c, 10);
    await stop(p);
    const before = await checkpoint(c);

    await q('SELECT pg_drop_replication_slot($1)', [c.slot]);
    await insert(c, 11, 110);

    const run = await failedRun(c);
    const line = expectStopped(run, 'SLOT_MISSING');
    expect(line).toContain(`"${c.slot}" does not exist`);
    const [reported] = run.readiness!.body['sources'] as Array<{
      lastErrorDetails: { gapFromLsn: string } | null;
    }>;
    expect(reported!.lastErrorDetails?.gapFromLsn).toBe(gapFrom(before));
    expect(line).toContain(gapFrom(before));
    expect(line).toContain(`reset-source --source ${c.id} --accept-gap`);
    // check reads the same missing slot the same way: the same code, from the same position.
    const checked = await runToExit(c, ['check', '--json']);
    const slotFinding = (
      JSON.parse(checked.stdout.join('\n')) as {
        findings: Array<{ target: string; check: string; detail: string; code?: string }>;
      }
    ).findings.find((x) => x.target === c.id && x.check === 'slot');
    expect(slotFinding).toMatchObject({ code: 'SLOT_MISSING' });
    expect(slotFinding!.detail).toContain(`up to ${gapFrom(before)};`);
    expect(line).toContain(`up to ${gapFrom(before)};`);
    // Refused before creating anything: no new slot that would start at "now".
    expect(await slotRow(c)).toBeUndefined();
    expect(await storedIds(c)).toEqual(range(1, 10));

    // Without --accept-gap it only says what it would do.
    const dry = await reset(c);
    expect(dry.code, dry.stdout.join('\n') + dry.stderr.join('\n')).toBe(2);
    expect(dry.stdout.join('\n')).toContain('--accept-gap');
    expect(await gaps(c)).toEqual([]);
    expect(await slotRow(c)).toBeUndefined();

    const done = await reset(c, '--accept-gap');
    expect(done.code, done.stdout.join('\n') + done.stderr.join('\n')).toBe(0);
    const [gap, ...more] = await gaps(c);
    expect(more).toEqual([]);
    expect(gap!.reason).toBe('slot_missing');
    expect(gap!.slot_name).toBe(c.slot);
    expect(parseLsn(gap!.from_lsn)).toBeGreaterThanOrEqual(parseLsn(before.lsn));
    const newSlot = await slotRow(c);
    expect(newSlot).toBeDefined();
    expect(gap!.to_lsn).toBe(newSlot!.confirmed_flush_lsn);
    expect((await checkpoint(c)).lsn).toBe(gap!.to_lsn);

    const again = await start(c);
    await insert(c, 111, 112);
    expect(await waitForIds(c, 12)).toEqual([...range(1, 10), 111, 112]);
    await stop(again);
  });

  it('a slot advanced by another client while Philotes was stopped: stops with the gap instead of skipping it', async () => {
    const c = makeCase('advanced');
    await q(`CREATE TABLE ${c.table} (id int PRIMARY KEY, v text)`);
    const p = await start(c);
    await insert(c, 1, 5);
    await waitForIds(c, 5);
    await stop(p);
    const before = await checkpoint(c);

    await insert(c, 6, 75); // 70 transactions
    // Another client consumes the slot (what pg_recvlogical --start does, through SQL).
    await q(
      `SELECT count(*) FROM pg_logical_slot_get_binary_changes($1, NULL, NULL,
         'proto_version', '1', 'publication_names', $2)`,
      [c.slot, `pub_${c.id}`],
    );
    const advancedTo = (await slotRow(c))!.confirmed_flush_lsn;
    expect(parseLsn(advancedTo)).toBeGreaterThan(parseLsn(before.lsn));

    const run = await failedRun(c);
    const line = expectStopped(run, 'SLOT_ADVANCED');
    expect(line).toContain('advanced by another client');
    expect(line).toContain(advancedTo);
    expect(line).toContain(`reset-source --source ${c.id} --accept-gap`);
    expect(await storedIds(c)).toEqual(range(1, 5));
    // Stopping is not an answer: it must stay stopped until someone accepts the gap.
    expectStopped(await failedRun(c), 'SLOT_ADVANCED');

    const done = await reset(c, '--accept-gap');
    expect(done.code, done.stdout.join('\n') + done.stderr.join('\n')).toBe(0);
    const [gap] = await gaps(c);
    expect(gap).toMatchObject({ reason: 'slot_advanced', to_lsn: advancedTo });
    expect(parseLsn(gap!.from_lsn)).toBeGreaterThanOrEqual(parseLsn(before.lsn));
    expect(parseLsn(gap!.from_lsn)).toBeLessThan(parseLsn(advancedTo));

    const again = await start(c);
    await insert(c, 76, 76);
    expect(await waitForIds(c, 6)).toEqual([...range(1, 5), 76]);
    await stop(again);
  });

  it("Philotes' own idle confirmations move the slot past the checkpoint without being taken for a gap, even after kill -9", async () => {
    const c = makeCase('idle');
    await q(`CREATE TABLE ${c.table} (id int PRIMARY KEY, v text)`);
    await f.source.createDatabase('elsewhere');
    const p = await start(c);
    await insert(c, 1, 1);
    await waitForIds(c, 1);
    const stored = await checkpoint(c);
    // WAL moves in another database: nothing for this slot, so Philotes confirms the WAL end.
    await f.source.query(
      'CREATE TABLE noise AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g',
      [],
      'elsewhere',
    );
    await waitFor(
      async () => parseLsn((await slotRow(c))!.confirmed_flush_lsn) > parseLsn(stored.lsn),
      { what: 'an idle confirmation past the checkpoint', timeoutMs: 60_000 },
    );
    // It was recorded before it was sent.
    const recorded = await checkpoint(c);
    expect(parseLsn(recorded.confirmed_lsn!)).toBeGreaterThanOrEqual(
      parseLsn((await slotRow(c))!.confirmed_flush_lsn),
    );
    await p.kill9();
    keep(p);

    const again = await start(c);
    await insert(c, 2, 2);
    expect(await waitForIds(c, 2)).toEqual([1, 2]);
    await stop(again);
    expect(await gaps(c)).toEqual([]);
  });

  it('a key column renamed while Philotes was behind: events name the key as the stream had it, and no spurious schema version', async () => {
    const c = makeCase('rename');
    await q(`CREATE TABLE ${c.table} (id int PRIMARY KEY, a int)`);
    await q(`CREATE TABLE ${c.table}_full (id int PRIMARY KEY, a int)`);
    await q(`ALTER TABLE ${c.table}_full REPLICA IDENTITY FULL`);
    const p = await start(c);
    await q(`INSERT INTO ${c.table} VALUES (0, 0)`);
    await q(`INSERT INTO ${c.table}_full VALUES (0, 0)`);
    await waitForIds(c, 1);
    await stop(p);

    for (const t of [c.table, `${c.table}_full`]) {
      await q(`INSERT INTO ${t} VALUES (1, 1)`);
      await q(`ALTER TABLE ${t} RENAME COLUMN id TO "order id"`);
      await q(`INSERT INTO ${t} VALUES (2, 2)`);
    }
    const again = await start(c);
    const events = await waitFor(
      async () => {
        const rows = await b<{
          table_name: string;
          after: Record<string, unknown>;
          primary_key: string[];
        }>(
          `SELECT table_name, after, primary_key FROM cdc_events
            WHERE source_id = $1 ORDER BY lsn, seq`,
          [c.id],
        );
        return rows.length >= 6 ? rows : false;
      },
      { what: 'six events', timeoutMs: 60_000 },
    );
    await stop(again);
    const plain = events.filter((e) => e.table_name === c.table);
    expect(plain.map((e) => [e.after, e.primary_key])).toEqual([
      [{ id: 0, a: 0 }, ['id']],
      [{ id: 1, a: 1 }, ['id']],
      [{ 'order id': 2, a: 2 }, ['order id']],
    ]);
    // Under REPLICA IDENTITY FULL the stream does not say which columns form the key; whatever
    // stands in, it never names a column the event does not have.
    for (const e of events) {
      for (const key of e.primary_key) expect(Object.keys(e.after)).toContain(key);
    }
    const history = await b<{ version: number; primary_key: string[]; names: string[] }>(
      `SELECT version, primary_key, ARRAY(SELECT c->>'name' FROM jsonb_array_elements(columns) c) AS names
         FROM cdc_schema_history WHERE source_id = $1 AND table_name = $2 ORDER BY version`,
      [c.id, c.table],
    );
    expect(history.map((h) => [h.version, h.names, h.primary_key])).toEqual([
      [1, ['id', 'a'], ['id']],
      [2, ['order id', 'a'], ['order id']],
    ]);
  });

  it('a publication dropped while streaming: stops with the way out instead of looping, and reset-source --skip-to-current gets past it', async () => {
    const c = makeCase('nopub');
    await q(`CREATE TABLE ${c.table} (id int PRIMARY KEY, v text)`);
    const p = startPhilotes(c.env);
    await waitForSlotActive(f.source, c.slot);
    await insert(c, 1, 1);
    await waitForIds(c, 1);
    await q(`DROP PUBLICATION pub_${c.id}`);
    await insert(c, 2, 2);
    // The stream's error stops the source; the process stays up until told to stop.
    await waitFor(() => p.stderr.length > 0, { what: 'the source to stop', timeoutMs: 60_000 });
    expect(p.status(), outputTail(p)).toBeNull();
    await stop(p);
    expect(p.stderr.join('\n')).toContain(`publication "pub_${c.id}"`);
    expect(p.stderr.join('\n')).toContain('--skip-to-current');

    // The next start does not recreate the publication (that would not help) and says why.
    const second = await failedRun(c);
    expect(expectStopped(second, 'PUBLICATION_MISSING')).toContain(`publication "pub_${c.id}"`);
    expect(await q('SELECT 1 FROM pg_publication WHERE pubname = $1', [`pub_${c.id}`])).toEqual([]);

    // An operator recreates it by hand: still stopped (the slot would decode the changes made
    // while it was missing), with the same way out, never a loop and never a silent skip.
    await q(`CREATE PUBLICATION pub_${c.id} FOR ALL TABLES`);
    await insert(c, 3, 3);
    expect(expectStopped(await failedRun(c))).toContain('--skip-to-current');
    expect(await storedIds(c)).toEqual([1]);

    const done = await reset(c, '--accept-gap', '--skip-to-current');
    expect(done.code, done.stdout.join('\n') + done.stderr.join('\n')).toBe(0);
    const [gap] = await gaps(c);
    expect(gap!.reason).toBe('skip_to_current');

    const again = await start(c);
    await insert(c, 4, 4);
    expect(await waitForIds(c, 2)).toEqual([1, 4]);
    await stop(again);
  });

  it('a slot invalidated for needing more WAL than max_slot_wal_keep_size: stops with the gap; reset-source recreates it', async () => {
    const c = makeCase('lost');
    await q(`CREATE TABLE ${c.table} (id int PRIMARY KEY, v text)`);
    const p = await start(c);
    await insert(c, 1, 3);
    await waitForIds(c, 3);
    await stop(p);
    const before = await checkpoint(c);

    await invalidateSlot(c, 4);

    const line = expectStopped(await failedRun(c), 'SLOT_INVALIDATED');
    expect(line).toContain('invalidated');
    expect(line).toContain(gapFrom(before));
    expect(line).toContain(`reset-source --source ${c.id} --accept-gap`);
    expect(await storedIds(c)).toEqual(range(1, 3));

    // --snapshot: the gap's record begins a snapshot too, so the buffer can rebuild the table.
    const done = await reset(c, '--accept-gap', '--snapshot');
    expect(done.code, done.stdout.join('\n') + done.stderr.join('\n')).toBe(0);
    expect(done.stdout.join('\n')).toMatch(/with snapshot #\d+ of every published table/);
    const [gap] = await gaps(c);
    expect(gap!.reason).toBe('slot_invalidated');
    const [slot] = await q<{ wal_status: string }>(
      'SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1',
      [c.slot],
    );
    expect(slot!.wal_status).not.toBe('lost');

    const again = await start(c);
    await insert(c, 1000, 1000);
    await waitFor(async () => (await storedIds(c)).includes(1000), {
      what: 'a row after the reset to be stored',
      timeoutMs: 60_000,
    });
    await waitFor(
      async () =>
        (
          await b<{ state: string }>(
            `SELECT state FROM cdc_snapshots WHERE source_id = $1 AND reason = 'on_demand'`,
            [c.id],
          )
        )[0]?.state === 'done',
      { what: 'the snapshot begun with the gap', timeoutMs: 60_000 },
    );
    const expected = new Map(
      (await q<{ id: number; v: string }>(`SELECT id, v FROM ${c.table}`)).map((r) => [r.id, r.v]),
    );
    expect(await replayed(c, gap!.to_lsn)).toEqual(expected);
    await stop(again);
  });

  /**
   * The table rebuilt from the buffer from `from` on (after a gap: its end, where the new snapshot
   * begins): (lsn, seq) order, SNAPSHOT and INSERT/UPDATE as upserts.
   */
  async function replayed(c: Case, from = '0/0'): Promise<Map<number, string>> {
    const events = await b<{ operation: string; id: number; v: string | null; old: number | null }>(
      `SELECT operation, coalesce(after, before)->>'id' AS id, after->>'v' AS v,
              (before->>'id')::int AS old
         FROM cdc_events WHERE source_id = $1 AND table_name = $2 AND lsn >= $3::pg_lsn
        ORDER BY lsn, seq`,
      [c.id, c.table, from],
    );
    const rows = new Map<number, string>();
    for (const e of events) {
      if (e.operation === 'DELETE') rows.delete(Number(e.id));
      else if (e.operation === 'TRUNCATE') rows.clear();
      else rows.set(Number(e.id), e.v ?? '');
    }
    return rows;
  }

  /**
   * snapshot: when_needed: changes are lost under a checkpoint (`lose`, which returns the next free
   * id); the source recovers by itself, records the gap, and the new snapshot rebuilds the table.
   */
  async function recoversByItself(
    name: string,
    reason: string,
    lose: (c: Case) => Promise<number>,
  ): Promise<void> {
    const c = makeCase(name);
    c.env = {
      ...c.env,
      PHILOTES_CDC_SNAPSHOT: 'when_needed',
      PHILOTES_CDC_TABLES: `public.${c.table}`,
    };
    await q(`CREATE TABLE ${c.table} (id int PRIMARY KEY, v text)`);
    await insert(c, 1, 5);
    const p = await start(c);
    // when_needed is also initial for a new source: the five rows come as SNAPSHOT events.
    await waitFor(async () => (await replayed(c)).size === 5, {
      what: 'the initial snapshot',
      timeoutMs: 60_000,
    });
    await insert(c, 6, 8);
    await waitForIds(c, 3);
    await stop(p);
    const before = await checkpoint(c);

    const next = await lose(c);
    await q(`DELETE FROM ${c.table} WHERE id = 3`);

    // No person acts: the same command as before recovers by itself and goes on streaming.
    const metricsPort = await freePort();
    const again = startPhilotes({
      ...c.env,
      PHILOTES_METRICS_PORT: String(metricsPort),
      PHILOTES_METRICS_HOST: '127.0.0.1',
    });
    const [gap] = await waitFor(
      async () => {
        const found = await gaps(c);
        return found.length > 0 ? found : false;
      },
      { what: 'the gap to be recorded', timeoutMs: 60_000 },
    );
    expect(gap!.reason).toBe(reason);
    expect(gap!.from_lsn).toBe(gapFrom(before));
    await waitFor(
      async () =>
        (
          await b<{ state: string }>(
            `SELECT state FROM cdc_snapshots WHERE source_id = $1 AND reason = 'when_needed'`,
            [c.id],
          )
        )[0]?.state === 'done',
      { what: 'the when_needed snapshot to finish', timeoutMs: 60_000 },
    );
    await q(`INSERT INTO ${c.table} VALUES ($1, 'after')`, [next + 1]);
    const expected = new Map(
      (await q<{ id: number; v: string }>(`SELECT id, v FROM ${c.table}`)).map((r) => [r.id, r.v]),
    );
    // Replayed from the new snapshot (the gap's end), the buffer equals the table: the row
    // deleted and the one changed during the gap included.
    await waitFor(async () => (await replayed(c, gap!.to_lsn)).has(next + 1), {
      what: 'a row after the recovery',
      timeoutMs: 60_000,
    });
    expect(await replayed(c, gap!.to_lsn)).toEqual(expected);
    expect(expected.has(3)).toBe(false);
    expect(expected.get(2)).toBe('changed in the gap');
    const [initial, healed] = await b<{ reason: string; state: string; rows: string }>(
      `SELECT reason, state, rows FROM cdc_snapshots WHERE source_id = $1 ORDER BY id`,
      [c.id],
    );
    expect(initial).toMatchObject({ reason: 'initial', state: 'done', rows: '5' });
    expect(healed).toMatchObject({ reason: 'when_needed', state: 'done' });
    expect(Number(healed!.rows)).toBe(expected.size - 1); // the row inserted after it is no snapshot row
    const metrics = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(metrics).toContain(`philotes_snapshots_total{source="${c.id}",reason="when_needed"} 1`);
    expect(metrics).toContain(
      `philotes_gaps_recorded_total{source="${c.id}",reason="${reason}"} 1`,
    );
    const readiness = (await (await fetch(`http://127.0.0.1:${metricsPort}/readyz`)).json()) as {
      sources: Array<{ state: string; snapshot: { reason: string; state: string } | null }>;
    };
    expect(readiness.sources[0]).toMatchObject({
      state: 'streaming',
      snapshot: { reason: 'when_needed', state: 'done' },
    });
    await stop(again);
  }

  it('snapshot: when_needed — a slot invalidated under a checkpoint: the source recovers by itself, records the gap, and the new snapshot rebuilds the table', async () => {
    await recoversByItself('healed', 'slot_invalidated', (c) => invalidateSlot(c, 100));
  });

  it('snapshot: when_needed — a slot dropped under a checkpoint: the same, with a new slot', async () => {
    await recoversByItself('regrown', 'slot_missing', async (c) => {
      await q('SELECT pg_drop_replication_slot($1)', [c.slot]);
      await q(`INSERT INTO ${c.table} VALUES (100, 'during the gap')`);
      await q(`UPDATE ${c.table} SET v = 'changed in the gap' WHERE id = 2`);
      return 101;
    });
  });

  it('snapshot: when_needed — a slot advanced by another client: the same, from where the slot is', async () => {
    await recoversByItself('overtaken', 'slot_advanced', async (c) => {
      await q(`INSERT INTO ${c.table} VALUES (100, 'during the gap')`);
      await q(`UPDATE ${c.table} SET v = 'changed in the gap' WHERE id = 2`);
      await q('SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())', [c.slot]);
      return 101;
    });
  });
});

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from + 1 }, (_, i) => from + i);
}
