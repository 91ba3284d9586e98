/**
 * What an operator sees when Philotes cannot start: a bad setting stops it with exit code 2 and
 * one line naming the problem; a source it can never use fails with one line naming the problem
 * (and is retried slowly, the process staying up); a source that is merely unreachable is
 * retried (the process stays up and says so on /readyz and /metrics). No password is printed in
 * any of these cases.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, startCluster, type Cluster } from '../support/cluster.js';
import { startFixture, type Fixture } from '../support/fixture.js';
import {
  runPhilotesToExit,
  runUntilSourceFails,
  startPhilotes,
  type FailedSourceRun,
  type PhilotesRun,
} from '../support/philotes.js';
import { waitFor } from '../support/poll.js';

const SECRET = 's3cr3t-pw-XYZ';
/** Generous: other test files share the two cores. */
const EXIT_DEADLINE_MS = 60_000;

/** Fails with the whole output, so a leaked secret is shown where it leaked. */
function expectNoSecret(
  run: Pick<PhilotesRun, 'stdout' | 'stderr'>,
  secrets: readonly string[],
): void {
  const all = [...run.stdout, ...run.stderr].join('\n');
  for (const secret of secrets) {
    if (all.includes(secret)) {
      throw new Error(`secret ${JSON.stringify(secret)} printed:\n${all}`);
    }
  }
}

/**
 * A source that can never work: it is reported in one stderr line ("philotes: source ...") and
 * /readyz says `failed`, while the process stays up (it retries slowly, and other sources would
 * go on) until SIGTERM ends it with 0. The line is returned for further checks.
 */
function expectFailedSource(run: FailedSourceRun): string {
  const context = `exit ${run.code} signal ${run.signal}\nstderr:\n${run.stderr.join('\n')}\nstdout tail:\n${run.stdout.slice(-10).join('\n')}`;
  expect(run.stillRunning, context).toBe(true);
  expect(run.code, context).toBe(0);
  expect(run.stderr, context).toHaveLength(1);
  expect(run.readiness?.status, context).toBe(503);
  const line = run.stderr[0]!;
  expect(line, context).toMatch(/^philotes: source "app": \S/);
  return line;
}

/** Exit 2, exactly one stderr line of the form "philotes: ...", returned for further checks. */
function expectUsageExit(run: PhilotesRun): string {
  const context = `exit ${run.code} signal ${run.signal}\nstderr:\n${run.stderr.join('\n')}\nstdout tail:\n${run.stdout.slice(-10).join('\n')}`;
  expect(run.code, context).toBe(2);
  expect(run.stderr, context).toHaveLength(1);
  const line = run.stderr[0]!;
  expect(line, context).toMatch(/^philotes: \S/);
  return line;
}

describe('start-up errors', () => {
  let f: Fixture;
  /** Passwords that must never be printed: ours and the real ones of the test clusters. */
  let secrets: string[];

  beforeAll(async () => {
    f = await startFixture();
    secrets = [SECRET, encodeURIComponent(SECRET), f.source.password, f.buffer.password];
  });

  afterAll(async () => {
    await f?.destroy();
  });

  describe('a bad configuration value stops start-up with one line naming the variable', () => {
    /**
     * A complete, otherwise valid configuration carrying the secret twice: as the source password
     * and inside the buffer URL (which the individual buffer variables then override).
     */
    const base = (): Record<string, string> =>
      f.env({
        PHILOTES_CDC_SOURCE_PASSWORD: SECRET,
        PHILOTES_BUFFER_URL: `postgres://philotes:${SECRET}@${f.buffer.host}:${f.buffer.port}/buffer`,
      });

    const cases: Array<{
      name: string;
      change: (env: Record<string, string>) => void;
      variable: string;
    }> = [
      {
        name: 'a port that is not a number',
        change: (env) => (env['PHILOTES_CDC_SOURCE_PORT'] = 'abc'),
        variable: 'PHILOTES_CDC_SOURCE_PORT',
      },
      {
        name: 'a duration without a unit it knows',
        change: (env) => (env['PHILOTES_CDC_CHECKPOINT_INTERVAL'] = 'soon'),
        variable: 'PHILOTES_CDC_CHECKPOINT_INTERVAL',
      },
      {
        // Slot names are interpolated into replication commands: this one must never get there.
        name: 'a slot name that is not a plain identifier',
        change: (env) => (env['PHILOTES_CDC_REPLICATION_SLOT'] = 'bad-name;drop'),
        variable: 'PHILOTES_CDC_REPLICATION_SLOT',
      },
      {
        name: 'a missing source database',
        change: (env) => delete env['PHILOTES_CDC_SOURCE_DATABASE'],
        variable: 'PHILOTES_CDC_SOURCE_DATABASE',
      },
      {
        // The URL parser's own message would quote the input, password included.
        name: 'a buffer URL with an impossible port (and a password in it)',
        change: (env) => {
          for (const part of ['HOST', 'PORT', 'DATABASE', 'USER', 'PASSWORD'])
            delete env[`PHILOTES_BUFFER_${part}`];
          env['PHILOTES_BUFFER_URL'] = `postgres://philotes:${SECRET}@127.0.0.1:99999/buffer`;
        },
        variable: 'PHILOTES_BUFFER_URL',
      },
    ];

    for (const c of cases) {
      it(c.name, async () => {
        const env = base();
        c.change(env);
        const run = await runPhilotesToExit(env, EXIT_DEADLINE_MS);
        const line = expectUsageExit(run);
        expect(line).toContain(c.variable);
        expectNoSecret(run, secrets);
      });
    }
  });

  describe('a source it can never use', () => {
    let replicaOnly: Cluster;

    beforeAll(async () => {
      replicaOnly = await startCluster({ walLevel: 'replica' });
      await replicaOnly.createDatabase('app');
    });

    afterAll(async () => {
      await replicaOnly?.destroy();
    });

    it('wal_level = replica: the source fails with one line about wal_level', async () => {
      const metricsPort = await freePort();
      const run = await runUntilSourceFails(
        f.env({
          PHILOTES_CDC_SOURCE_PORT: String(replicaOnly.port),
          PHILOTES_CDC_SOURCE_PASSWORD: replicaOnly.password,
          PHILOTES_METRICS_PORT: String(metricsPort),
          PHILOTES_METRICS_HOST: '127.0.0.1',
        }),
        { metricsPort },
      );
      const line = expectFailedSource(run);
      expect(line).toContain('wal_level');
      expectNoSecret(run, [...secrets, replicaOnly.password]);
      // Refused before touching anything: no slot was created on the unusable server.
      const slots = await replicaOnly.query('SELECT slot_name FROM pg_replication_slots');
      expect(slots).toEqual([]);
    });

    it('wrong source password: the source fails with one line about authentication', async () => {
      const metricsPort = await freePort();
      const run = await runUntilSourceFails(
        f.env({
          PHILOTES_CDC_SOURCE_PASSWORD: SECRET,
          PHILOTES_METRICS_PORT: String(metricsPort),
          PHILOTES_METRICS_HOST: '127.0.0.1',
        }),
        { metricsPort },
      );
      const line = expectFailedSource(run);
      expect(line).toMatch(/password authentication failed/);
      expectNoSecret(run, secrets);
    });

    it('wrong source password inside PHILOTES_CDC_SOURCE_URL: the URL is not printed either', async () => {
      const env = f.env();
      for (const part of ['HOST', 'PORT', 'DATABASE', 'USER', 'PASSWORD']) {
        delete env[`PHILOTES_CDC_SOURCE_${part}`];
      }
      env['PHILOTES_CDC_SOURCE_URL'] =
        `postgres://${f.source.user}:${encodeURIComponent(SECRET)}@${f.source.host}:${f.source.port}/app`;
      const metricsPort = await freePort();
      env['PHILOTES_METRICS_PORT'] = String(metricsPort);
      env['PHILOTES_METRICS_HOST'] = '127.0.0.1';
      const run = await runUntilSourceFails(env, { metricsPort });
      const line = expectFailedSource(run);
      expect(line).toMatch(/password authentication failed/);
      expectNoSecret(run, secrets);
    });
  });

  it('an unreachable source is retried, reported on /readyz and /metrics, and SIGTERM exits 0', async () => {
    // Nothing listens here: every connection attempt is refused, which is worth retrying.
    const deadPort = await freePort();
    const metricsPort = await freePort();
    const philotes = startPhilotes(
      f.env({
        PHILOTES_CDC_SOURCE_PORT: String(deadPort),
        PHILOTES_CDC_SOURCE_PASSWORD: SECRET,
        PHILOTES_METRICS_PORT: String(metricsPort),
        PHILOTES_METRICS_HOST: '127.0.0.1',
      }),
    );
    try {
      const base = `http://127.0.0.1:${metricsPort}`;
      const restarts = await waitFor(
        async () => {
          const body = await (await fetch(`${base}/metrics`)).text();
          const match = /^philotes_reader_restarts_total\{source="app"\} (\d+)$/m.exec(body);
          const n = match ? Number(match[1]) : 0;
          return n >= 2 ? n : false;
        },
        { what: 'philotes_reader_restarts_total >= 2', timeoutMs: 60_000, intervalMs: 250 },
      );
      expect(restarts).toBeGreaterThanOrEqual(2);

      // Still running after failing twice: a refused connection is not a reason to give up.
      expect(philotes.proc.exitCode, philotes.stderr.join('\n')).toBeNull();
      const res = await fetch(`${base}/readyz`);
      const health = (await res.json()) as {
        status: string;
        sources: Array<Record<string, unknown>>;
      };
      expect(health.sources).toHaveLength(1);
      const source = health.sources[0]!;
      expect(source['source']).toBe('app');
      expect(source['state']).not.toBe('streaming');
      expect(['starting', 'backoff']).toContain(source['state']);
      expect(String(source['lastError'])).toMatch(/ECONNREFUSED/);
      expect(String(source['lastError'])).toContain(
        `connection refused by source 127.0.0.1:${deadPort}`,
      );
      expect(await (await fetch(`${base}/metrics`)).text()).toMatch(
        /^philotes_reader_up\{source="app"\} 0$/m,
      );

      expect(philotes.signal('SIGTERM')).toBe(true);
      // waitFor races the call against its deadline, so a hang fails here instead of at vitest's.
      const exit = await waitFor(() => philotes.exited, {
        what: 'philotes to exit after SIGTERM',
        timeoutMs: 30_000,
      });
      expect(exit, philotes.stderr.join('\n')).toEqual({ code: 0, signal: null });
      expect(philotes.stderr).toEqual([]);
      expectNoSecret(philotes, secrets);
    } finally {
      await philotes.kill9();
    }
  });
});
