/**
 * Several sources from one configuration file, on two source servers, into one buffer: every
 * source's changes land exactly once, /readyz lists them all, and a file with mistakes stops
 * start-up with every mistake on its own line.
 */
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCluster, type Cluster } from '../support/cluster.js';
import { startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { waitForExit } from '../support/faults.js';
import {
  linesWithDuplicateKeys,
  runPhilotesToExit,
  startPhilotes,
  type PhilotesProcess,
} from '../support/philotes.js';
import { freePort } from '../support/ports.js';
import { waitFor } from '../support/poll.js';

const ROWS = 50;

describe('a fleet from a configuration file', () => {
  let f: Fixture;
  let second: Cluster;
  let dir: string;
  let philotes: PhilotesProcess | undefined;

  beforeAll(async () => {
    [f, second] = await Promise.all([startFixture(), startCluster()]);
    await Promise.all([
      f.source.createDatabase('shop'),
      f.source.createDatabase('billing'),
      second.createDatabase('crm'),
    ]);
    // Every test that streams shop, billing or crm finds its table there, whichever ran first.
    for (const s of sources())
      await s.cluster.query('CREATE TABLE t (id int PRIMARY KEY, v text)', [], s.database);
    dir = mkdtempSync(join(tmpdir(), 'philotes-fleet-'));
  });

  afterAll(async () => {
    await philotes?.kill9();
    await Promise.allSettled([f?.destroy(), second?.destroy()]);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  interface SourceReport {
    source: string;
    state: string;
    attempts: number;
    lastError: string | null;
  }

  /**
   * Starts Philotes on a config file whose passwords come from BUFFER_PASSWORD and `passwords`;
   * `readyz` reads its /readyz.
   */
  /** A REPLICATION role that owns a database of its name with a table t it may publish. */
  async function replicatingOwner(name: string, password: string): Promise<void> {
    await f.source.query(`CREATE ROLE ${name} LOGIN REPLICATION PASSWORD '${password}'`);
    await f.source.createDatabase(name);
    await f.source.query('CREATE TABLE t (id int PRIMARY KEY)', [], name);
    await f.source.query(`ALTER TABLE t OWNER TO ${name}`, [], name);
    await f.source.query(`GRANT CREATE ON DATABASE ${name} TO ${name}`, [], name);
  }

  async function startFromFile(
    path: string,
    passwords: Record<string, string>,
  ): Promise<{
    p: PhilotesProcess;
    readyz: () => Promise<{ status: number; sources: SourceReport[] }>;
  }> {
    const metricsPort = await freePort();
    philotes = startPhilotes(
      {
        BUFFER_PASSWORD: f.buffer.password,
        ...passwords,
        PHILOTES_METRICS_PORT: String(metricsPort),
        PHILOTES_METRICS_HOST: '127.0.0.1',
      },
      { args: ['--config', path] },
    );
    return {
      p: philotes,
      readyz: async () => {
        const res = await fetch(`http://127.0.0.1:${metricsPort}/readyz`, {
          signal: AbortSignal.timeout(5_000),
        });
        const body = (await res.json()) as { sources: SourceReport[] };
        return { status: res.status, sources: body.sources };
      },
    };
  }

  function sources() {
    return [
      { id: 'shop', cluster: f.source, database: 'shop', slot: 'philotes_shop' },
      { id: 'billing', cluster: f.source, database: 'billing', slot: 'philotes_billing' },
      { id: 'crm', cluster: second, database: 'crm', slot: 'philotes_crm' },
    ];
  }

  it('captures every source exactly once, and /readyz lists them all', async () => {
    const passwordFile = join(dir, 'crm-password');
    writeFileSync(passwordFile, `${second.password}\n`);
    const path = join(dir, 'p.yaml');
    writeFileSync(
      path,
      `# three sources on two servers
buffer:
  host: ${f.buffer.host}
  port: ${f.buffer.port}
  database: buffer
  user: ${f.buffer.user}
  passwordEnv: BUFFER_PASSWORD
defaults:
  checkpointInterval: 1s
  snapshot: never # about the stream: rows written around the start come once, as changes
restartMinDelay: 100ms
restartMaxDelay: 2s
sources:
  - id: shop
    host: ${f.source.host}
    port: ${f.source.port}
    database: shop
    user: ${f.source.user}
    password: "${f.source.password}"
    slot: philotes_shop
  - id: billing
    url: postgres://${f.source.user}@${f.source.host}:${f.source.port}/billing
    passwordEnv: SOURCE_PASSWORD
    slot: philotes_billing
    batchMaxRows: 7
  - id: crm
    host: ${second.host}
    port: ${second.port}
    database: crm
    user: ${second.user}
    passwordFile: ${passwordFile}
    slot: philotes_crm
`,
    );
    const { p, readyz } = await startFromFile(path, { SOURCE_PASSWORD: f.source.password });
    for (const s of sources()) await waitForSlotActive(s.cluster, s.slot);
    await Promise.all(
      sources().map(async (s) => {
        for (let id = 1; id <= ROWS; id++) {
          await s.cluster.query(`INSERT INTO t VALUES ($1, $2)`, [id, s.id], s.database);
        }
        await s.cluster.query(`UPDATE t SET v = v || '!' WHERE id <= 10`, [], s.database);
      }),
    );
    for (const s of sources()) {
      const events = await waitFor(
        async () => {
          const rows = await f.buffer.query<{ operation: string; id: number; v: string }>(
            `SELECT operation, (after->>'id')::int AS id, after->>'v' AS v FROM cdc_events
              WHERE source_id = $1 ORDER BY lsn, seq`,
            [s.id],
            'buffer',
          );
          return rows.length >= ROWS + 10 ? rows : false;
        },
        { what: `the events of ${s.id}`, timeoutMs: 60_000 },
      );
      expect(events).toHaveLength(ROWS + 10);
      expect(events.filter((e) => e.operation === 'INSERT').map((e) => e.id)).toEqual(
        Array.from({ length: ROWS }, (_, i) => i + 1),
      );
      expect(new Set(events.map((e) => e.v.replace('!', '')))).toEqual(new Set([s.id]));
    }
    const ready = await readyz();
    expect(ready.status).toBe(200);
    expect(ready.sources.map((s) => [s.source, s.state])).toEqual([
      ['shop', 'streaming'],
      ['billing', 'streaming'],
      ['crm', 'streaming'],
    ]);
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(p, 30_000)).toEqual({ code: 0, signal: null });
    expect(linesWithDuplicateKeys(p.stdout)).toEqual([]);
    const all = [...p.stdout, ...p.stderr].join('\n');
    for (const secret of [f.source.password, second.password, f.buffer.password])
      expect(all).not.toContain(secret);
  });

  it('one source with a bad password fails alone while another streams, and recovers by itself once the password is fixed', async () => {
    await replicatingOwner('flaky', 'right-pw');
    await f.source.query(`ALTER ROLE flaky PASSWORD 'changed-pw'`);
    const path = join(dir, 'two.yaml');
    writeFileSync(
      path,
      `buffer: { host: ${f.buffer.host}, port: ${f.buffer.port}, database: buffer, user: ${f.buffer.user}, passwordEnv: BUFFER_PASSWORD }
defaults: { checkpointInterval: 1s, snapshot: never }
restartMinDelay: 100ms
restartMaxDelay: 1s
sources:
  - { id: flaky, host: ${f.source.host}, port: ${f.source.port}, database: flaky, user: flaky, password: right-pw, slot: philotes_flaky, tables: [public.t] }
  - { id: steady, host: ${second.host}, port: ${second.port}, database: crm, user: ${second.user}, passwordEnv: CRM_PASSWORD, slot: philotes_steady }
`,
    );
    const { p, readyz } = await startFromFile(path, { CRM_PASSWORD: second.password });
    const report = async () => (await readyz()).sources;
    await waitFor(
      async () => (await report()).find((s) => s.source === 'flaky')?.state === 'failed',
      {
        what: 'the flaky source to fail',
        timeoutMs: 60_000,
      },
    );
    expect(p.stderr.join('\n')).toMatch(/source "flaky": .*password authentication failed/);
    // The other source streams and captures meanwhile.
    await waitForSlotActive(second, 'philotes_steady');
    await second.query(`INSERT INTO t VALUES (1000, 'steady')`, [], 'crm');
    const stored = (id: string) =>
      f.buffer.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM cdc_events WHERE source_id = $1 AND operation = 'INSERT'`,
        [id],
        'buffer',
      );
    await waitFor(async () => (await stored('steady'))[0]!.n >= 1, {
      what: 'the steady source to store its row',
      timeoutMs: 60_000,
    });
    expect(p.status()).toBeNull();

    // A person fixes the password; no restart of Philotes.
    await f.source.query(`ALTER ROLE flaky PASSWORD 'right-pw'`);
    await waitFor(
      async () => (await report()).find((s) => s.source === 'flaky')?.state === 'streaming',
      {
        what: 'the flaky source to recover by itself',
        timeoutMs: 60_000,
      },
    );
    await f.source.query('INSERT INTO t VALUES (1)', [], 'flaky');
    await waitFor(async () => (await stored('flaky'))[0]!.n === 1, {
      what: 'the recovered source to store its row',
      timeoutMs: 60_000,
    });
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(p, 30_000)).toEqual({ code: 0, signal: null });
  });

  it('a password file rotated on disk, as Kubernetes rotates a secret, is used at the next attempt without a signal', async () => {
    await replicatingOwner('rotated', 'new-pw');
    const secret = join(dir, 'rotated-password');
    writeFileSync(secret, 'old-pw\n');
    const path = join(dir, 'rotated.yaml');
    writeFileSync(
      path,
      `buffer: { host: ${f.buffer.host}, port: ${f.buffer.port}, database: buffer, user: ${f.buffer.user}, passwordEnv: BUFFER_PASSWORD }
defaults: { checkpointInterval: 1s, snapshot: never }
restartMinDelay: 100ms
restartMaxDelay: 1s
sources:
  - { id: rotated, host: ${f.source.host}, port: ${f.source.port}, database: rotated, user: rotated, passwordFile: ${secret}, slot: philotes_rotated, tables: [public.t] }
`,
    );
    const { p, readyz } = await startFromFile(path, {});
    const state = async () => (await readyz()).sources.find((s) => s.source === 'rotated')?.state;
    await waitFor(async () => (await state()) === 'failed', {
      what: 'the source with the old password to fail',
      timeoutMs: 60_000,
    });
    // The secret is replaced the way a kubelet does it: a new file renamed over the old one.
    writeFileSync(`${secret}.new`, 'new-pw\n');
    renameSync(`${secret}.new`, secret);
    await waitFor(async () => (await state()) === 'streaming', {
      what: 'the source to connect with the new password, without SIGHUP',
      timeoutMs: 60_000,
    });
    await f.source.query('INSERT INTO t VALUES (1)', [], 'rotated');
    await waitFor(
      async () =>
        (
          await f.buffer.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM cdc_events WHERE source_id = 'rotated' AND operation = 'INSERT'`,
            [],
            'buffer',
          )
        )[0]!.n === 1,
      { what: 'the row to be stored', timeoutMs: 60_000 },
    );
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(p, 30_000)).toEqual({ code: 0, signal: null });
    const all = [...p.stdout, ...p.stderr].join('\n');
    expect(all).not.toContain('new-pw');
    expect(all).not.toContain('old-pw');
  });

  it('a reader thread over its heap limit is replaced and restarted alone, with growing delays', async () => {
    await second.createDatabase('tiny');
    const path = join(dir, 'heap.yaml');
    writeFileSync(
      path,
      `buffer: { host: ${f.buffer.host}, port: ${f.buffer.port}, database: buffer, user: ${f.buffer.user}, passwordEnv: BUFFER_PASSWORD }
defaults: { snapshot: never }
restartMinDelay: 100ms
restartMaxDelay: 2s
sources:
  # 4 MB cannot even load the reader's modules: every start runs out of heap.
  - { id: tiny, host: ${second.host}, port: ${second.port}, database: tiny, user: ${second.user}, passwordEnv: CRM_PASSWORD, slot: philotes_tiny, readerHeapLimitMb: 4 }
  - { id: roomy, host: ${second.host}, port: ${second.port}, database: crm, user: ${second.user}, passwordEnv: CRM_PASSWORD, slot: philotes_roomy }
`,
    );
    const { p, readyz } = await startFromFile(path, { CRM_PASSWORD: second.password });
    const report = async (id: string) => (await readyz()).sources.find((s) => s.source === id)!;
    const tiny = await waitFor(
      async () => {
        const r = await report('tiny');
        return r.attempts >= 3 ? r : false;
      },
      { what: 'the tiny reader to fail three times', timeoutMs: 60_000 },
    );
    expect(tiny.state).not.toBe('streaming');
    expect(tiny.lastError).toContain('exceeded its heap limit (readerHeapLimitMb 4)');
    // Growing delays: the log says when each next attempt is. (Its lines reach us through a pipe,
    // after /readyz may already count the attempt: wait for them.)
    const delays = () =>
      p
        .logs()
        .filter((l) => l['source'] === 'tiny' && typeof l['retryInMs'] === 'number')
        .map((l) => l['retryInMs'] as number);
    await waitFor(async () => delays().length >= 3, {
      what: 'three retry lines of the tiny reader',
      timeoutMs: 30_000,
    });
    // The other reader is unaffected: it streams and stores.
    await waitFor(async () => (await report('roomy')).state === 'streaming', {
      what: 'the roomy source to stream',
      timeoutMs: 60_000,
    });
    await second.query(`INSERT INTO t VALUES (2000, 'roomy')`, [], 'crm');
    await waitFor(
      async () =>
        (
          await f.buffer.query(
            `SELECT 1 FROM cdc_events WHERE source_id = 'roomy' AND after->>'id' = '2000'`,
            [],
            'buffer',
          )
        ).length === 1,
      { what: 'the roomy source to store its row', timeoutMs: 60_000 },
    );
    expect(p.status()).toBeNull();
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(p, 30_000)).toEqual({ code: 0, signal: null });
  });

  it('SIGHUP adds a source, removes another and restarts a changed one while the rest streams untouched; an invalid file is rejected and the running set kept', async () => {
    for (const db of ['hup_keep', 'hup_gone', 'hup_new']) {
      await second.createDatabase(db);
      await second.query('CREATE TABLE t (id int PRIMARY KEY)', [], db);
    }
    const source = (id: string) =>
      `  - { id: ${id}, host: ${second.host}, port: ${second.port}, database: hup_${id}, user: ${second.user}, passwordEnv: CRM_PASSWORD, slot: philotes_hup_${id} }`;
    const head = `buffer: { host: ${f.buffer.host}, port: ${f.buffer.port}, database: buffer, user: ${f.buffer.user}, passwordEnv: BUFFER_PASSWORD }
defaults: { checkpointInterval: 1s, snapshot: never }
sources:
`;
    const path = join(dir, 'hup.yaml');
    writeFileSync(path, head + [source('keep'), source('gone')].join('\n'));
    const { p, readyz } = await startFromFile(path, { CRM_PASSWORD: second.password });
    const walsender = async (id: string) =>
      (
        await second.query<{ pid: number | null; active: boolean }>(
          'SELECT active_pid AS pid, active FROM pg_replication_slots WHERE slot_name = $1',
          [`philotes_hup_${id}`],
        )
      )[0];
    const states = async () => (await readyz()).sources.map((r) => [r.source, r.state]);
    const storedRow = (id: string, row: number) =>
      waitFor(
        async () =>
          (
            await f.buffer.query(
              `SELECT 1 FROM cdc_events WHERE source_id = $1 AND after->>'id' = $2`,
              [id, String(row)],
              'buffer',
            )
          ).length === 1,
        { what: `row ${row} of ${id} to be stored`, timeoutMs: 60_000 },
      );
    await waitForSlotActive(second, 'philotes_hup_keep');
    await waitForSlotActive(second, 'philotes_hup_gone');
    for (const id of ['keep', 'gone']) {
      await second.query('INSERT INTO t VALUES (1)', [], `hup_${id}`);
      await storedRow(id, 1);
    }
    const keepPid = (await walsender('keep'))!.pid;

    writeFileSync(path, head + [source('keep'), source('new')].join('\n'));
    expect(p.signal('SIGHUP')).toBe(true);
    await waitFor(
      async () =>
        JSON.stringify(await states()) ===
        JSON.stringify([
          ['keep', 'streaming'],
          ['new', 'streaming'],
        ]),
      { what: '/readyz to list keep and new, both streaming', timeoutMs: 60_000 },
    );
    // The removed source stopped gracefully: its slot released, its final position confirmed.
    await waitFor(async () => (await walsender('gone'))?.active === false, {
      what: 'the removed source to release its slot',
      timeoutMs: 30_000,
    });
    const [gone] = await f.buffer.query<{ ok: boolean }>(
      `SELECT lsn::pg_lsn <= $1::pg_lsn AS ok FROM cdc_checkpoints WHERE source_id = 'gone'`,
      [
        (
          await second.query<{ lsn: string }>(
            `SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = 'philotes_hup_gone'`,
          )
        )[0]!.lsn,
      ],
      'buffer',
    );
    expect(gone?.ok).toBe(true);
    // The source that stayed was not restarted.
    expect((await walsender('keep'))!.pid).toBe(keepPid);
    for (const id of ['keep', 'new']) {
      await second.query('INSERT INTO t VALUES (2)', [], `hup_${id}`);
      await storedRow(id, 2);
    }

    // A changed source restarts (a new walsender); the others are not touched.
    const newPid = (await walsender('new'))!.pid;
    writeFileSync(
      path,
      head + [source('keep'), `${source('new').slice(0, -2)}, batchMaxRows: 10 }`].join('\n'),
    );
    expect(p.signal('SIGHUP')).toBe(true);
    await waitFor(
      async () => {
        const w = await walsender('new');
        return w?.active === true && w.pid !== newPid;
      },
      { what: 'the changed source to restart on a new walsender', timeoutMs: 60_000 },
    );
    expect((await walsender('keep'))!.pid).toBe(keepPid);
    await second.query('INSERT INTO t VALUES (3)', [], 'hup_new');
    await storedRow('new', 3);
    const [once] = await f.buffer.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM cdc_events WHERE source_id = 'new'`,
      [],
      'buffer',
    );
    expect(once!.n).toBe(2); // rows 2 and 3, each once

    // An invalid file: rejected with its problems, nothing changes.
    writeFileSync(
      path,
      head + [source('keep'), source('new'), '  - { id: bad, slot: Bad }'].join('\n'),
    );
    const errorsBefore = p.stderr.length;
    expect(p.signal('SIGHUP')).toBe(true);
    await waitFor(() => p.stderr.length > errorsBefore, {
      what: 'the invalid file to be reported',
      timeoutMs: 30_000,
    });
    expect(p.stderr.slice(errorsBefore).join('\n')).toMatch(/sources\[2\]\.slot must match/);
    expect(await states()).toEqual([
      ['keep', 'streaming'],
      ['new', 'streaming'],
    ]);
    expect((await walsender('keep'))!.pid).toBe(keepPid);
    expect(p.signal('SIGTERM')).toBe(true);
    expect(await waitForExit(p, 30_000)).toEqual({ code: 0, signal: null });
  });

  it('a file with several mistakes: each on its own line, exit 2, no secret', async () => {
    const path = join(dir, 'bad.yaml');
    writeFileSync(
      path,
      `buffer: { url: "postgres://u:hunter2-secret@b/buf" }
sources:
  - { id: a, url: "postgres://u:hunter2-secret@s/app", slot: Bad-Slot }
  - { id: b, url: "postgres://u@s/app", slto: x }
`,
    );
    const run = await runPhilotesToExit({ PHILOTES_CONFIG: path });
    expect(run.code, run.stderr.join('\n')).toBe(2);
    expect(run.stderr).toEqual([
      expect.stringMatching(/^philotes: sources\[0\]\.slot must match .* got "Bad-Slot"$/),
      'philotes: sources[1].slot is required',
      'philotes: sources[1].slto: unknown key (did you mean "slot"?)',
    ]);
    expect([...run.stdout, ...run.stderr].join('\n')).not.toContain('hunter2');
  });
});
