/**
 * `philotes-worker check` against real servers with planted problems: each is found, named with
 * how to fix it, and sets the exit code (0 ok, 1 warnings, 2 blockers); and check itself changes
 * nothing — no buffer tables, no slot, no publication appear.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LogicalReplicationService, PgoutputPlugin } from 'pg-logical-replication';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/cluster.js';
import { waitForSlotActive } from '../support/fixture.js';
import { runPhilotesToExit, startPhilotes } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

interface Finding {
  target: string;
  check: string;
  verdict: 'ok' | 'warning' | 'blocker';
  detail: string;
  fix: string | null;
}

describe('philotes-worker check', () => {
  let good: Cluster;
  let replica: Cluster;
  let buffer: Cluster;
  let dir: string;

  beforeAll(async () => {
    [good, replica, buffer] = await Promise.all([
      startCluster(),
      startCluster({ walLevel: 'replica' }),
      startCluster(),
    ]);
    await buffer.createDatabase('buffer');
    for (const db of ['shop', 'unkeyed', 'gap']) {
      await good.createDatabase(db);
      await good.query('CREATE TABLE items (id int PRIMARY KEY, v text)', [], db);
    }
    await good.query('CREATE TABLE events_log (at timestamptz, v text)', [], 'unkeyed');
    await good.query(`CREATE ROLE plain LOGIN PASSWORD 'plain-pw'`);
    await replica.createDatabase('app');
    dir = mkdtempSync(join(tmpdir(), 'philotes-check-'));
  });

  afterAll(async () => {
    await Promise.allSettled([good?.destroy(), replica?.destroy(), buffer?.destroy()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  function configFile(sources: string[], bufferDatabase = 'buffer'): string {
    const path = join(dir, `check-${Math.random().toString(36).slice(2, 8)}.yaml`);
    writeFileSync(
      path,
      [
        `buffer: { host: ${buffer.host}, port: ${buffer.port}, database: ${bufferDatabase}, user: ${buffer.user}, passwordEnv: BUFFER_PASSWORD }`,
        'defaults: { snapshot: never }',
        'sources:',
        ...sources.map((s) => `  - ${s}`),
      ].join('\n'),
    );
    return path;
  }

  /** A source entry on cluster `c` as its superuser, with a slot named after its id. */
  const on = (c: Cluster, db: string, id: string) =>
    `{ id: ${id}, host: ${c.host}, port: ${c.port}, database: ${db}, user: ${c.user}, passwordEnv: ${c === good ? 'GOOD_PASSWORD' : 'REPLICA_PASSWORD'}, slot: philotes_${id} }`;

  function env(): Record<string, string> {
    return {
      BUFFER_PASSWORD: buffer.password,
      GOOD_PASSWORD: good.password,
      REPLICA_PASSWORD: replica.password,
    };
  }

  async function check(
    path: string,
  ): Promise<{ code: number | null; findings: Finding[]; text: string }> {
    const json = await runPhilotesToExit(env(), 60_000, {
      args: ['--config', path, 'check', '--json'],
    });
    const table = await runPhilotesToExit(env(), 60_000, { args: ['--config', path, 'check'] });
    expect(table.code).toBe(json.code);
    const parsed = JSON.parse(json.stdout.join('\n')) as { exitCode: number; findings: Finding[] };
    expect(parsed.exitCode).toBe(json.code);
    return { code: json.code, findings: parsed.findings, text: table.stdout.join('\n') };
  }

  function finding(findings: Finding[], target: string, name: string): Finding {
    const found = findings.find((f) => f.target === target && f.check === name);
    if (!found) throw new Error(`no ${name} finding for ${target}: ${JSON.stringify(findings)}`);
    return found;
  }

  it('a clean source and a fresh buffer: ready to run, and check created nothing', async () => {
    // Its own source database and buffer database: fresh whichever test ran before.
    await good.createDatabase('clean');
    await good.query('CREATE TABLE items (id int PRIMARY KEY, v text)', [], 'clean');
    await buffer.createDatabase('fresh');
    const path = configFile([on(good, 'clean', 'clean')], 'fresh');
    const r = await check(path);
    expect(
      r.findings.filter((f) => f.verdict !== 'ok'),
      r.text,
    ).toEqual([]);
    expect(r.code).toBe(0);
    expect(finding(r.findings, 'clean', 'slot').detail).toContain('first start creates it');
    expect(finding(r.findings, 'buffer', 'schema').detail).toContain('first start creates them');
    expect(finding(r.findings, 'clean', 'protocol').detail).toContain('protocol 2');
    // A superuser source role may terminate any stale walsender when a replica takes over.
    expect(finding(r.findings, 'clean', 'slot takeover').detail).toContain('of any role');
    expect(r.text).toContain('ready to run');
    // Nothing was created by looking.
    expect(
      await good.query(`SELECT slot_name FROM pg_replication_slots WHERE database = 'clean'`),
    ).toEqual([]);
    expect(await good.query(`SELECT pubname FROM pg_publication`, [], 'clean')).toEqual([]);
    expect(await buffer.query(`SELECT to_regclass('cdc_events') AS t`, [], 'fresh')).toEqual([
      { t: null },
    ]);
  });

  it('finds each planted problem, says how to fix it, and exits 2', async () => {
    const path = configFile([
      on(replica, 'app', 'replica'),
      `{ host: ${good.host}, port: ${good.port}, database: shop, user: plain, password: plain-pw, id: norepl, slot: philotes_norepl }`,
      `{ host: ${good.host}, port: ${good.port}, database: shop, user: ${good.user}, password: wrong, id: badpw, slot: philotes_badpw }`,
      on(good, 'nosuchdb', 'nodb'),
      on(good, 'unkeyed', 'unkeyed'),
    ]);
    const r = await check(path);
    expect(r.code).toBe(2);
    const wal = finding(r.findings, 'replica', 'wal_level');
    expect(wal.verdict).toBe('blocker');
    expect(wal.fix).toContain('wal_level = logical');
    const repl = finding(r.findings, 'norepl', 'replication');
    expect(repl.verdict).toBe('blocker');
    expect(repl.fix).toBe('ALTER ROLE plain REPLICATION');
    // A plain role may end only walsenders of its own role: said, not a problem.
    expect(finding(r.findings, 'norepl', 'slot takeover')).toMatchObject({
      verdict: 'ok',
      detail: expect.stringContaining('of its own role') as unknown,
    });
    // Not a superuser: it cannot create a FOR ALL TABLES publication either.
    expect(finding(r.findings, 'norepl', 'publication').verdict).toBe('blocker');
    const pw = finding(r.findings, 'badpw', 'connection');
    expect(pw.verdict).toBe('blocker');
    expect(pw.detail).toMatch(/password/);
    expect(pw.fix).toMatch(/password/);
    expect(finding(r.findings, 'nodb', 'connection').fix).toMatch(/database/);
    // The first start would not create a publication that breaks the table's writes.
    const identity = finding(r.findings, 'unkeyed', 'replica identity');
    expect(identity.verdict).toBe('blocker');
    expect(identity.detail).toContain('public.events_log');
    expect(identity.fix).toContain('keylessTables');
    // No secret in the output.
    expect(r.text).not.toContain('plain-pw');
    expect(r.text).not.toContain(good.password);
    expect(r.text).toContain('fix the blockers first');
  });

  it('a keyless table under each keylessTables: the same rule the first start applies', async () => {
    const withMode = (mode: string) =>
      configFile([on(good, 'unkeyed', 'unkeyed').replace(/ }$/, `, keylessTables: ${mode} }`)]);
    const left = await check(withMode('leave_out'));
    const leftOut = finding(left.findings, 'unkeyed', 'replica identity');
    expect(leftOut.verdict).toBe('warning');
    expect(leftOut.detail).toMatch(/left out.*public\.events_log/);
    expect(finding(left.findings, 'unkeyed', 'publication').detail).toContain('kept current');
    const full = await check(withMode('identity_full'));
    expect(finding(full.findings, 'unkeyed', 'replica identity')).toMatchObject({
      verdict: 'ok',
      detail: expect.stringContaining('REPLICA IDENTITY FULL') as unknown,
    });
    const accepted = await check(withMode('accept'));
    expect(finding(accepted.findings, 'unkeyed', 'replica identity')).toMatchObject({
      verdict: 'warning',
      detail: expect.stringContaining('will refuse UPDATE and DELETE') as unknown,
    });
  });

  it('a role that may replicate but not read a published table: the first snapshot is a blocker, fixed by the GRANT it names', async () => {
    await good.createDatabase('locked');
    await good.query('CREATE TABLE items (id int PRIMARY KEY, v text)', [], 'locked');
    await good.query('CREATE PUBLICATION philotes_pub FOR TABLE items', [], 'locked');
    await good.query(`CREATE ROLE snapper LOGIN REPLICATION PASSWORD 'snapper-pw'`);
    const entry = (snapshot: string) =>
      `{ host: ${good.host}, port: ${good.port}, database: locked, user: snapper, password: snapper-pw, id: locked, slot: philotes_locked, snapshot: ${snapshot} }`;
    const denied = await check(configFile([entry('initial')]));
    expect(denied.code).toBe(2);
    const privilege = finding(denied.findings, 'locked', 'snapshot privilege');
    expect(privilege.verdict).toBe('blocker');
    expect(privilege.detail).toContain('public.items');
    expect(privilege.fix).toBe(
      'GRANT SELECT ON public.items TO snapper, or snapshot: never for this source',
    );
    // Without a snapshot in the first run, the same gap is only worth a warning.
    const never = await check(configFile([entry('never')]));
    expect(finding(never.findings, 'locked', 'snapshot privilege').verdict).toBe('warning');

    await good.query('GRANT SELECT ON items TO snapper', [], 'locked');
    const granted = await check(configFile([entry('initial')]));
    expect(finding(granted.findings, 'locked', 'snapshot privilege').verdict).toBe('ok');
    expect(granted.findings.filter((f) => f.verdict === 'blocker')).toEqual([]);
  });

  it('a slot another client streams is a blocker that names the client', async () => {
    await good.createDatabase('held');
    await good.query('CREATE TABLE items (id int PRIMARY KEY)', [], 'held');
    await good.query('CREATE PUBLICATION philotes_pub FOR ALL TABLES', [], 'held');
    await good.query(
      `SELECT pg_create_logical_replication_slot('philotes_held', 'pgoutput')`,
      [],
      'held',
    );
    // Another consumer on the slot: a leftover tool, a copy-pasted configuration.
    const other = new LogicalReplicationService(
      {
        host: good.host,
        port: good.port,
        database: 'held',
        user: good.user,
        password: good.password,
        application_name: 'other-consumer',
      },
      { acknowledge: { auto: false, timeoutSeconds: 0 } },
    );
    other.on('error', () => undefined);
    void other
      .subscribe(
        new PgoutputPlugin({ protoVersion: 1, publicationNames: ['philotes_pub'] }),
        'philotes_held',
      )
      .catch(() => undefined);
    try {
      await waitForSlotActive(good, 'philotes_held');
      const r = await check(configFile([on(good, 'held', 'held')]));
      expect(r.code, r.text).toBe(2);
      const slot = finding(r.findings, 'held', 'slot');
      expect(slot.verdict).toBe('blocker');
      expect(slot.detail).toContain('in use by other-consumer');
      expect(slot.fix).toMatch(/stop that client/);
    } finally {
      await other.stop();
    }
  });

  it('a source a running Philotes fails on: check and status say so, with its last error, until it stops', async () => {
    await good.createDatabase('failing');
    await good.query('CREATE TABLE nokey (v text)', [], 'failing');
    const path = configFile([on(good, 'failing', 'failing')]);
    const philotes = startPhilotes(
      { ...env(), PHILOTES_METRICS_PORT: '0' },
      { args: ['--config', path] },
    );
    try {
      await waitFor(
        async () =>
          (
            await buffer.query<{ state: string }>(
              `SELECT state FROM cdc_source_status WHERE source_id = 'failing'`,
              [],
              'buffer',
            )
          )[0]?.state === 'failed',
        { what: 'the running Philotes to report the source failed', timeoutMs: 60_000 },
      );
      const r = await check(path);
      expect(r.code, r.text).toBe(2);
      const running = finding(r.findings, 'failing', 'running');
      expect(running.verdict).toBe('blocker');
      expect(running.detail).toMatch(/reports it failed since .*KEYLESS_TABLES: .*public\.nokey/);
      expect(running.fix).toContain('keylessTables');
      const status = await runPhilotesToExit(env(), 60_000, {
        args: ['--config', path, 'status', '--json'],
      });
      expect(status.code).toBe(1);
      const [row] = (
        JSON.parse(status.stdout.join('\n')) as {
          sources: Array<{ problem: string; reported: { state: string } | null }>;
        }
      ).sources;
      expect(row!.reported?.state).toBe('failed');
      expect(row!.problem).toMatch(
        /^not streaming: Philotes on \S+ reports it failed since .*KEYLESS_TABLES/,
      );
    } finally {
      philotes.signal('SIGTERM');
      await philotes.exited;
    }
    // A clean stop takes its report away: nobody reads a stopped process as failing.
    expect(
      await buffer.query(
        `SELECT 1 FROM cdc_source_status WHERE source_id = 'failing'`,
        [],
        'buffer',
      ),
    ).toEqual([]);
    const after = await check(path);
    expect(after.findings.filter((f) => f.check === 'running')).toEqual([]);
  });

  it("a slot advanced behind the buffer's back is a continuity blocker with the reset command", async () => {
    const path = configFile([on(good, 'gap', 'gap')]);
    const philotes = startPhilotes(
      { ...env(), PHILOTES_METRICS_PORT: '0' },
      { args: ['--config', path] },
    );
    await waitForSlotActive(good, 'philotes_gap');
    await good.query(`INSERT INTO items VALUES (1, 'a')`, [], 'gap');
    // The buffer holds this source now: a checkpoint, and the row.
    await waitFor(
      async () =>
        (
          await buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE source_id = 'gap'`,
            [],
            'buffer',
          )
        )[0]!.n === 1,
      { what: 'the row to be stored', timeoutMs: 30_000 },
    );
    philotes.signal('SIGTERM');
    await philotes.exited;
    // Someone else consumes the slot: the server would skip these changes for Philotes.
    await good.query(`INSERT INTO items VALUES (2, 'b')`, [], 'gap');
    await good.query(
      `SELECT pg_replication_slot_advance('philotes_gap', pg_current_wal_lsn())`,
      [],
      'gap',
    );
    const r = await check(path);
    expect(r.code, r.text).toBe(2);
    const continuity = finding(r.findings, 'gap', 'continuity');
    expect(continuity.verdict).toBe('blocker');
    // With the --config it was configured by: the command runs as suggested.
    expect(continuity.fix).toBe(
      `philotes-worker reset-source --source gap --accept-gap --config ${path}`,
    );
    expect(finding(r.findings, 'buffer', 'schema').verdict).toBe('ok');
  });
});
