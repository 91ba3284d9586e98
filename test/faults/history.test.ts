/**
 * A source whose server is no longer the history the buffer holds: a data directory restored
 * from a disk snapshot (slot included), a standby promoted after a failover that lacks the slot,
 * and the first run's start, which must be recorded before the slot streams. Each must stop the
 * source loudly (SOURCE_DIVERGED, SLOT_ADVANCED), and `reset-source --accept-gap` must record the
 * truth: the buffer's events of the lost history retracted, what the server committed before its
 * new slot recorded as lost, and a replay of what is left equal to the server's rows.
 *
 * Each case has its own source cluster (they are stopped, restored and promoted) and its own
 * buffer database on one buffer cluster.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLsn } from '../../src/common/lsn.js';
import { startCluster, startClusterFromCopy, type Cluster } from '../support/cluster.js';
import { philotesEnv, waitForSlotActive } from '../support/fixture.js';
import { outputTail, waitForExit } from '../support/faults.js';
import {
  runPhilotesToExit,
  runUntilSourceFails,
  startPhilotes,
  type FailedSourceRun,
  type PhilotesProcess,
} from '../support/philotes.js';
import { freePort } from '../support/ports.js';
import { waitFor } from '../support/poll.js';

const SLOT = 'philotes_cdc';
/** Each case stops, copies, restores or promotes servers and runs Philotes five or six times. */
const HEAVY_MS = 240_000;

describe('a source with another history', () => {
  let buffer: Cluster;
  const clusters: Cluster[] = [];

  beforeAll(async () => {
    buffer = await startCluster();
  });

  afterAll(async () => {
    await Promise.allSettled([buffer?.destroy(), ...clusters.map((c) => c.destroy())]);
  });

  async function newSource(): Promise<Cluster> {
    const source = await startCluster();
    clusters.push(source);
    await source.createDatabase('app');
    await source.query(`CREATE TABLE t (id int PRIMARY KEY, v text)`, [], 'app');
    return source;
  }

  function env(name: string, source: Cluster, extra: Record<string, string> = {}) {
    return philotesEnv(source, buffer, {
      PHILOTES_CDC_SOURCE_ID: name,
      PHILOTES_BUFFER_DATABASE: name,
      ...extra,
    });
  }

  const b = <T = Record<string, unknown>>(db: string, sql: string, params: unknown[] = []) =>
    buffer.query<T>(sql, params, db);

  /** One transaction per row. */
  async function insert(source: Cluster, from: number, to: number, v = 'x'): Promise<void> {
    for (let id = from; id <= to; id++)
      await source.query(`INSERT INTO t VALUES ($1, $2)`, [id, v], 'app');
  }

  /** The buffer replayed in (lsn, seq) order: id -> v. */
  async function replay(db: string, sourceId: string): Promise<Map<number, string>> {
    const rows = await b<{
      operation: string;
      after: { id: number; v: string } | null;
      before: { id: number } | null;
    }>(
      db,
      `SELECT operation, after, before FROM cdc_events
        WHERE source_id = $1 AND table_name = 't' ORDER BY lsn, seq`,
      [sourceId],
    );
    const state = new Map<number, string>();
    for (const r of rows) {
      if (r.operation === 'DELETE') state.delete(r.before!.id);
      else if (r.after) state.set(r.after.id, r.after.v);
    }
    return state;
  }

  async function sourceRows(source: Cluster): Promise<Map<number, string>> {
    const rows = await source.query<{ id: number; v: string }>('SELECT id, v FROM t', [], 'app');
    return new Map(rows.map((r) => [r.id, r.v]));
  }

  async function waitForStored(db: string, sourceId: string, count: number): Promise<void> {
    await waitFor(async () => (await replay(db, sourceId)).size >= count, {
      what: `${count} rows of ${sourceId} in the buffer`,
      timeoutMs: 60_000,
    });
  }

  async function stop(p: PhilotesProcess): Promise<void> {
    p.signal('SIGTERM');
    const exit = await waitForExit(p, 30_000);
    expect(exit, outputTail(p)).toEqual({ code: 0, signal: null });
  }

  async function failedRun(e: Record<string, string>): Promise<FailedSourceRun> {
    const metricsPort = await freePort();
    return runUntilSourceFails(
      { ...e, PHILOTES_METRICS_PORT: String(metricsPort), PHILOTES_METRICS_HOST: '127.0.0.1' },
      { metricsPort },
    );
  }

  function stoppedWith(run: FailedSourceRun, code: string): Record<string, unknown> {
    const context = `stderr:\n${run.stderr.join('\n')}\nstdout:\n${run.stdout.slice(-8).join('\n')}`;
    expect(run.stillRunning, context).toBe(true);
    const [source] = (run.readiness?.body['sources'] ?? []) as Array<Record<string, unknown>>;
    expect(source?.['lastErrorCode'], context).toBe(code);
    return source!;
  }

  async function reset(e: Record<string, string>, sourceId: string) {
    return runPhilotesToExit(e, 60_000, {
      args: ['reset-source', '--source', sourceId, '--accept-gap'],
    });
  }

  /**
   * Captures rows 1..`copied`, copies the stopped server's data directory (a disk snapshot, slot
   * included), then captures rows up to `captured` as a transaction each. Returns the copy and
   * the checkpoint the buffer then holds.
   */
  async function captureAroundDiskCopy(
    name: string,
    source: Cluster,
    e: Record<string, string>,
    copied: number,
    captured: number,
  ): Promise<{ disk: string; before: { lsn: string } }> {
    let p = startPhilotes(e);
    await waitForSlotActive(source, SLOT);
    await insert(source, 1, copied);
    await waitForStored(name, name, copied);
    await stop(p);
    await source.stop();
    const disk = await source.copyData();
    await source.start();
    p = startPhilotes(e);
    await waitForSlotActive(source, SLOT);
    await insert(source, copied + 1, captured);
    await waitForStored(name, name, captured);
    await stop(p);
    const [before] = await b<{ lsn: string }>(name, 'SELECT lsn FROM cdc_checkpoints');
    return { disk, before: before! };
  }

  interface Gap {
    id: string;
    from_lsn: string;
    to_lsn: string;
    reason: string;
  }
  const gaps = (db: string) =>
    b<Gap>(db, 'SELECT id::text, from_lsn::text, to_lsn::text, reason FROM cdc_gaps ORDER BY id');

  it(
    'a data directory restored from a disk snapshot: stops, then the lost history is retracted and the server re-read from its slot',
    async () => {
      const name = 'restored';
      await buffer.createDatabase(name);
      const source = await newSource();
      const e = env(name, source);
      const { disk, before } = await captureAroundDiskCopy(name, source, e, 20, 220);

      // Restored: 200 transactions are gone; the application writes 20 more (less WAL).
      await source.stop();
      await source.restoreData(disk);
      await source.start();
      await insert(source, 1001, 1020, 'after the restore');

      const run = await failedRun(e);
      const state = stoppedWith(run, 'SOURCE_DIVERGED');
      expect(run.stderr[0]).toContain('behind the buffer');
      expect(JSON.stringify(state)).toContain(before!.lsn);

      // The views say so too: check blocks, status names it and exits non-zero.
      const check = await runPhilotesToExit(e, 60_000, { args: ['check', '--json'] });
      const findings = (
        JSON.parse(check.stdout.join('\n')) as { findings: Array<Record<string, unknown>> }
      ).findings;
      expect(check.code).toBe(2);
      expect(findings.find((x) => x['check'] === 'history')).toMatchObject({
        verdict: 'blocker',
        fix: `philotes-worker reset-source --source ${name} --accept-gap (retracts the buffer's events of the lost history and records what was lost)`,
      });
      const status = await runPhilotesToExit(e, 60_000, { args: ['status', '--json'] });
      const [row] = (
        JSON.parse(status.stdout.join('\n')) as { sources: Array<Record<string, unknown>> }
      ).sources;
      expect(status.code).toBe(1);
      expect(row?.['historyCode']).toBe('SOURCE_DIVERGED');
      expect(String(row?.['problem'])).toContain(before!.lsn);

      const done = await reset(e, name);
      expect(done.code, done.stdout.join('\n') + done.stderr.join('\n')).toBe(0);
      const recorded = await gaps(name);
      // The slot came back with the disk: nothing lost, the dead history retracted.
      expect(recorded.map((g) => g.reason)).toEqual(['retracted']);
      expect(recorded[0]!.to_lsn).toBe(before!.lsn);
      const [slot] = await source.query<{ lsn: string }>(
        'SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = $1',
        [SLOT],
      );
      expect(recorded[0]!.from_lsn).toBe(slot!.lsn);
      const [retracted] = await b<{ n: string }>(
        name,
        `SELECT count(*) AS n FROM cdc_retracted_events WHERE gap_id = $1 AND operation = 'INSERT'`,
        [recorded[0]!.id],
      );
      expect(Number(retracted!.n)).toBeGreaterThanOrEqual(200);

      const p = startPhilotes(e);
      await waitForSlotActive(source, SLOT);
      await insert(source, 1021, 1025, 'after the reset');
      await waitFor(async () => (await replay(name, name)).has(1025), {
        what: 'the rows written after the reset',
        timeoutMs: 60_000,
      });
      await stop(p);
      expect(await replay(name, name)).toEqual(await sourceRows(source));
    },
    HEAVY_MS,
  );

  it(
    'a data directory restored and written past the checkpoint before Philotes sees it: the last stored xid was never assigned there',
    async () => {
      const name = 'restored_ahead';
      await buffer.createDatabase(name);
      const source = await newSource();
      await source.query(`CREATE TABLE pad (id int PRIMARY KEY, p text)`, [], 'app');
      const e = env(name, source);
      // 200 transactions (200 xids) after the copy.
      const { disk, before } = await captureAroundDiskCopy(name, source, e, 10, 210);

      await source.stop();
      await source.restoreData(disk);
      await source.start();
      // One transaction, more WAL than the 200 lost ones: the WAL is past the checkpoint again.
      await source.query(
        `INSERT INTO pad SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g`,
        [],
        'app',
      );
      const [wal] = await source.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn');
      expect(parseLsn(wal!.lsn)).toBeGreaterThan(parseLsn(before!.lsn));

      const run = await failedRun(e);
      const state = stoppedWith(run, 'SOURCE_DIVERGED');
      expect((state['lastErrorDetails'] as Record<string, unknown>)['why']).toBe('xid_behind');

      const done = await reset(e, name);
      expect(done.code, done.stdout.join('\n') + done.stderr.join('\n')).toBe(0);
      expect((await gaps(name)).map((g) => g.reason)).toEqual(['retracted']);
      const p = startPhilotes(e);
      await waitForSlotActive(source, SLOT);
      await insert(source, 2001, 2002, 'after the reset');
      await waitFor(async () => (await replay(name, name)).has(2002), {
        what: 'the rows written after the reset',
        timeoutMs: 60_000,
      });
      await stop(p);
      expect(await replay(name, name)).toEqual(await sourceRows(source));
    },
    HEAVY_MS,
  );

  it(
    'a standby promoted after a failover, without the slot: stops, then the fork and what the new server committed before its slot are recorded',
    async () => {
      const name = 'failover';
      await buffer.createDatabase(name);
      const primary = await newSource();
      const e = env(name, primary);
      let p = startPhilotes(e);
      await waitForSlotActive(primary, SLOT);
      await insert(primary, 1, 20);
      await waitForStored(name, name, 20);
      await stop(p);

      // The standby was left behind here (an asynchronous one that stopped receiving).
      await primary.stop();
      const copy = await primary.copyData();
      await primary.start();
      const standby = await startClusterFromCopy(primary, copy, { standby: true });
      clusters.push(standby);

      p = startPhilotes(e);
      await waitForSlotActive(primary, SLOT);
      await insert(primary, 21, 60);
      await waitForStored(name, name, 60);
      await stop(p);
      const [cp] = await b<{ lsn: string }>(name, 'SELECT lsn FROM cdc_checkpoints');
      await primary.stop();

      await standby.promote();
      await waitFor(
        async () =>
          (await standby.query<{ r: boolean }>('SELECT pg_is_in_recovery() AS r'))[0]?.r === false,
        { what: 'the standby to be promoted', timeoutMs: 30_000 },
      );
      // Committed on the new primary before Philotes has a slot there: lost, and said so.
      const [lostFrom] = await standby.query<{ lsn: string }>(
        'SELECT pg_current_wal_lsn()::text AS lsn',
      );
      await insert(standby, 501, 505, 'before the new slot');
      const [lostTo] = await standby.query<{ lsn: string }>(
        'SELECT pg_current_wal_lsn()::text AS lsn',
      );

      const onStandby = env(name, standby);
      const run = await failedRun(onStandby);
      const state = stoppedWith(run, 'SOURCE_DIVERGED');
      expect(run.stderr[0]).toContain('timeline 2');
      expect(JSON.stringify(state)).toContain(cp!.lsn);

      const done = await reset(onStandby, name);
      expect(done.code, done.stdout.join('\n') + done.stderr.join('\n')).toBe(0);
      const recorded = await gaps(name);
      expect(recorded.map((g) => g.reason)).toEqual(['retracted', 'source_diverged']);
      const [retraction, lost] = recorded as [Gap, Gap];
      // The fork lies where the copy ended: before every row 21..60 and after rows 1..20.
      expect(retraction.to_lsn).toBe(cp!.lsn);
      expect(lost.from_lsn).toBe(retraction.from_lsn);
      expect(parseLsn(lost.from_lsn)).toBeLessThanOrEqual(parseLsn(lostFrom!.lsn));
      expect(parseLsn(lost.to_lsn)).toBeGreaterThanOrEqual(parseLsn(lostTo!.lsn));
      const [slot] = await standby.query<{ lsn: string }>(
        'SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = $1',
        [SLOT],
      );
      expect(lost.to_lsn).toBe(slot!.lsn);
      const [moved] = await b<{ n: string }>(
        name,
        `SELECT count(*) AS n FROM cdc_retracted_events WHERE operation = 'INSERT'`,
      );
      expect(Number(moved!.n)).toBe(40);

      p = startPhilotes(onStandby);
      await waitForSlotActive(standby, SLOT);
      await insert(standby, 601, 605, 'after the reset');
      await waitFor(async () => (await replay(name, name)).has(605), {
        what: 'the rows written after the reset',
        timeoutMs: 60_000,
      });
      await stop(p);
      // What the buffer holds is the new primary's rows, but for the lost ones the gap names.
      const expected = await sourceRows(standby);
      for (let id = 501; id <= 505; id++) expected.delete(id);
      expect(await replay(name, name)).toEqual(expected);
    },
    HEAVY_MS,
  );

  it(
    'a dump restored into a new cluster: stops as SOURCE_REPLACED, then reset --snapshot rebuilds from the new server',
    async () => {
      const name = 'replaced';
      await buffer.createDatabase(name);
      const old = await newSource();
      let p = startPhilotes(env(name, old));
      await waitForSlotActive(old, SLOT);
      await insert(old, 1, 30);
      await waitForStored(name, name, 30);
      await stop(p);
      // The "restore": the same rows in a new cluster, one more written there, before Philotes.
      const fresh = await newSource();
      await fresh.query(`INSERT INTO t SELECT g, 'x' FROM generate_series(1, 30) g`, [], 'app');
      await insert(fresh, 31, 31, 'on the new cluster');
      const e = env(name, fresh);

      const run = await failedRun(e);
      const state = stoppedWith(run, 'SOURCE_REPLACED');
      expect((state['lastErrorDetails'] as Record<string, unknown>)['why']).toBe(
        'system_identifier',
      );

      const done = await runPhilotesToExit(e, 60_000, {
        args: ['reset-source', '--source', name, '--accept-gap', '--snapshot'],
      });
      expect(done.code, done.stdout.join('\n') + done.stderr.join('\n')).toBe(0);
      expect((await gaps(name)).map((g) => g.reason)).toContain('source_replaced');
      p = startPhilotes(e);
      await waitFor(
        async () =>
          (
            await b<{ state: string }>(
              name,
              `SELECT state FROM cdc_snapshots WHERE source_id = $1 ORDER BY id DESC LIMIT 1`,
              [name],
            )
          )[0]?.state === 'done',
        { what: 'the snapshot of the new server', timeoutMs: 60_000 },
      );
      await insert(fresh, 32, 32, 'after the reset');
      await waitFor(async () => (await replay(name, name)).has(32), {
        what: 'the row written after the reset',
        timeoutMs: 60_000,
      });
      await stop(p);
      expect(await replay(name, name)).toEqual(await sourceRows(fresh));
    },
    HEAVY_MS,
  );

  it(
    'the first run records its start before streaming: a slot consumed before the first checkpoint stops the next start',
    async () => {
      const name = 'first_run';
      await buffer.createDatabase(name);
      const source = await newSource();
      // No idle confirmation, no batch: the start's record is all the buffer has.
      const e = env(name, source, { PHILOTES_CDC_CHECKPOINT_INTERVAL: '1h' });
      const p = startPhilotes(e);
      await waitForSlotActive(source, SLOT);
      await p.kill9();
      const [start] = await b<{ lsn: string; source_system_id: string | null }>(
        name,
        'SELECT lsn, source_system_id FROM cdc_checkpoints',
      );
      expect(start?.source_system_id).toMatch(/^\d+$/);

      // Someone else consumes the slot meanwhile.
      await waitFor(
        async () =>
          (
            await source.query<{ active: boolean }>(
              'SELECT active FROM pg_replication_slots WHERE slot_name = $1',
              [SLOT],
            )
          )[0]?.active === false,
        { what: 'the killed run to let go of the slot', timeoutMs: 30_000 },
      );
      await insert(source, 1, 5);
      await source.query(
        `SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())`,
        [SLOT],
        'app',
      );
      const run = await failedRun(e);
      stoppedWith(run, 'SLOT_ADVANCED');
      expect(await replay(name, name)).toEqual(new Map());
    },
    HEAVY_MS,
  );
});
