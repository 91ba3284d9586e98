/**
 * The Grafana dashboard and the Prometheus alert rules against a running Philotes: every metric
 * they name must be in its /metrics (with samples, once changes have flowed), every dashboard
 * query must be filtered by the source variable, and with promtool/prometheus on PATH the rules
 * are checked and unit-tested and every dashboard query is evaluated by a real Prometheus that
 * scrapes the worker.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../support/cluster.js';
import { startFixture, waitForSlotActive, type Fixture } from '../support/fixture.js';
import { startPhilotes, type PhilotesProcess } from '../support/philotes.js';
import { waitFor } from '../support/poll.js';
import { onProcessEnd } from '../support/process-end.js';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const DASHBOARD_FILE = join(REPO_ROOT, 'grafana/dashboards/philotes.json');
const RULES_FILE = join(REPO_ROOT, 'grafana/alerts/philotes-rules.yml');
const RULES_TEST_FILE = join(REPO_ROOT, 'grafana/alerts/philotes-rules.test.yml');
const SOURCE_ID = 'app';

const onPath = (bin: string): boolean => spawnSync(bin, ['--version']).status === 0;
const HAS_PROMTOOL = onPath('promtool');
const HAS_PROMETHEUS = onPath('prometheus');

// ---- what the dashboard and the rules ask for ----

/** Families of the whole process (no `source` label): the process_* ones and the writer's. */
const PROCESS_WIDE =
  /^(process_|philotes_(buffer_transactions|buffer_transaction_sources|buffer_up|in_flight_bytes|readers_held|lease_changes_total|fleet_members|sources_owned|buffer_partitions|buffer_bytes|buffer_oldest_event_age_seconds|retention_|consumer_expired))/;

function isProcessWide(name: string): boolean {
  return PROCESS_WIDE.test(name);
}

/** Every PromQL expression of the dashboard: panel targets (rows included) and variable queries. */
function dashboardExpressions(): { panels: string[]; variables: string[] } {
  const dashboard = JSON.parse(readFileSync(DASHBOARD_FILE, 'utf8')) as {
    panels: unknown[];
    templating: { list: Array<{ type: string; query?: unknown; definition?: string }> };
  };
  const panels: string[] = [];
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) node.forEach(walk);
    else if (typeof node === 'object' && node !== null) {
      for (const [key, value] of Object.entries(node)) {
        if (key === 'expr' && typeof value === 'string') panels.push(value);
        else walk(value);
      }
    }
  };
  walk(dashboard.panels);
  const variables = dashboard.templating.list
    .filter((v) => v.type === 'query')
    .map((v) =>
      typeof v.query === 'string' ? v.query : ((v.query as { query?: string })?.query ?? ''),
    );
  return { panels, variables };
}

/**
 * The `expr` of every rule. The file has no YAML parser to lean on (none is a dependency), so
 * this reads the two forms the file uses, `expr: <one line>` and `expr: |` + indented lines, and
 * the caller checks that it found one expression per rule.
 */
function ruleExpressions(): { alerts: number; exprs: string[] } {
  const lines = readFileSync(RULES_FILE, 'utf8').split('\n');
  const exprs: string[] = [];
  for (let i = 0; i < lines.length; i++) {
    const m = /^(\s*)expr:\s*(.*)$/.exec(lines[i]!);
    if (!m) continue;
    const indent = m[1]!.length;
    if (m[2] !== '|' && m[2] !== '>') {
      exprs.push(m[2]!.replace(/^'(.*)'$/, '$1'));
      continue;
    }
    const block: string[] = [];
    while (i + 1 < lines.length) {
      const next = lines[i + 1]!;
      if (next.trim() !== '' && next.length - next.trimStart().length <= indent) break;
      block.push(next.trim());
      i++;
    }
    exprs.push(block.join(' ').trim());
  }
  const alerts = lines.filter((l) => /^\s*- alert:/.test(l)).length;
  return { alerts, exprs };
}

/** Metric names in an expression: ours and the process metrics prom-client adds. */
function metricNames(expr: string): string[] {
  return [...expr.matchAll(/\b(?:philotes|process)_[a-zA-Z0-9_:]*/g)].map((m) => m[0]);
}

// ---- what Philotes exposes ----

interface Sample {
  name: string;
  labels: string;
  value: number;
}

function parseSamples(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (m) out.push({ name: m[1]!, labels: m[2] ?? '', value: Number(m[3]) });
  }
  return out;
}

function sampleValue(samples: Sample[], name: string, labels: string): number | undefined {
  return samples.find((s) => s.name === name && s.labels === labels)?.value;
}

/** Runs a command to completion; for promtool, which reads stdin or files and exits. */
function run(cmd: string, args: string[], input?: string) {
  const r = spawnSync(cmd, args, { input, encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, output: `${r.stdout ?? ''}${r.stderr ?? ''}`.trim() };
}

/** Grafana's variables as a plain query: our source, and a rate window Prometheus accepts. */
function substitute(expr: string): string {
  return expr.replaceAll('$__rate_interval', '1m').replaceAll('$source', SOURCE_ID);
}

// Rows written to the source: one event each. The transactions are the statements below.
const INSERTS = 30;
const UPDATES = 10;
const DELETES = 5;
const TRANSACTIONS = 5;

describe('observability: dashboard and alert rules against the real metrics', () => {
  let f: Fixture;
  let philotes: PhilotesProcess;
  let base: string;

  const scrape = async (): Promise<string> => {
    const res = await fetch(`${base}/metrics`, { signal: AbortSignal.timeout(10_000) });
    expect(res.status).toBe(200);
    return res.text();
  };

  beforeAll(async () => {
    f = await startFixture();
    await f.source.query('CREATE TABLE widgets (id int PRIMARY KEY, name text)', [], 'app');
    const port = await freePort();
    base = `http://127.0.0.1:${port}`;
    philotes = startPhilotes(
      f.env({ PHILOTES_METRICS_PORT: String(port), PHILOTES_METRICS_HOST: '127.0.0.1' }),
    );
    await waitForSlotActive(f.source);
    for (let t = 0; t < 3; t++) {
      await f.source.query(
        `INSERT INTO widgets SELECT g, 'w' || g FROM generate_series($1::int, $2::int) g`,
        [t * 10 + 1, t * 10 + 10],
        'app',
      );
    }
    // A consumer group that has begun the source: the consumer panels and rules have samples.
    await f.buffer.query(`SELECT philotes_create_consumer('dashboard')`, [], 'buffer');
    await f.buffer.query(
      `INSERT INTO cdc_consumer_offsets (consumer, source_id, lsn, seq) VALUES ('dashboard', 'app', '0/0', -1)`,
      [],
      'buffer',
    );
    await f.source.query(`UPDATE widgets SET name = name || '!' WHERE id <= 10`, [], 'app');
    await f.source.query('DELETE FROM widgets WHERE id > 25', [], 'app');
  });

  afterAll(async () => {
    philotes?.signal('SIGTERM');
    await philotes?.exited;
    await f?.destroy();
  });

  it('counts every row written in philotes_events_total', async () => {
    const expected = { INSERT: INSERTS, UPDATE: UPDATES, DELETE: DELETES, TRUNCATE: 0 };
    const counted = await waitFor(
      async () => {
        const samples = parseSamples(await scrape());
        const got = Object.fromEntries(
          Object.keys(expected).map((op) => [
            op,
            sampleValue(
              samples,
              'philotes_events_total',
              `{source="${SOURCE_ID}",operation="${op}"}`,
            ),
          ]),
        );
        return JSON.stringify(got) === JSON.stringify(expected) && samples;
      },
      { what: `philotes_events_total to count ${JSON.stringify(expected)}`, timeoutMs: 90_000 },
    );
    expect(sampleValue(counted, 'philotes_transactions_total', `{source="${SOURCE_ID}"}`)).toBe(
      TRANSACTIONS,
    );
  });

  it('answers /healthz and /readyz with 200 while streaming', async () => {
    const res = await fetch(`${base}/healthz`, { signal: AbortSignal.timeout(10_000) });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/application\/json/);
    const body = (await res.json()) as { status: string; sources: Array<{ source: string }> };
    expect(body.status).toBe('ok');
    expect(body.sources.map((s) => s.source)).toEqual([SOURCE_ID]);
    const ready = await fetch(`${base}/readyz`, { signal: AbortSignal.timeout(10_000) });
    expect(ready.status).toBe(200);
    const report = (await ready.json()) as {
      status: string;
      sources: Array<{ source: string; state: string; ready: boolean }>;
    };
    expect(report.status).toBe('ready');
    expect(report.sources).toMatchObject([{ source: SOURCE_ID, state: 'streaming', ready: true }]);
  });

  it('exposes every metric the dashboard and the alert rules use', async () => {
    const { panels, variables } = dashboardExpressions();
    const rules = ruleExpressions();
    expect(panels.length).toBeGreaterThan(10);
    expect(rules.exprs).toHaveLength(rules.alerts);
    const wanted = new Set([...panels, ...variables, ...rules.exprs].flatMap(metricNames));
    expect(wanted.size).toBeGreaterThan(10);

    // Some gauges are set only after the first stored batch or confirmation: wait for samples,
    // not only for the HELP line, so a panel would really show something.
    const missing = (samples: Sample[]): string[] =>
      [...wanted].filter(
        (name) =>
          !samples.some(
            (s) =>
              s.name === name &&
              (isProcessWide(name) || s.labels.includes(`source="${SOURCE_ID}"`)),
          ),
      );
    let last: string[] = [];
    await waitFor(
      async () => {
        last = missing(parseSamples(await scrape()));
        return last.length === 0;
      },
      { what: 'every metric used by the dashboard and the rules', timeoutMs: 60_000 },
    ).catch((err: unknown) => {
      throw new Error(`metrics not in the scrape: ${last.join(', ')}`, { cause: err });
    });
  });

  it("reports the WAL the source holds for the slot, the slot's wal_status and the build", async () => {
    // The metric is polled every 15 s, and the slot's restart_lsn may move on after a poll (an
    // idle confirmation): a sample read now can hold more than the source says now. Wait for a
    // scrape that agrees with the source: at most what it holds, in the status it reports.
    let seen = '';
    const samples = await waitFor(
      async () => {
        const all = parseSamples(await scrape());
        if (!all.some((s) => s.name === 'philotes_slot_retained_wal_bytes')) return false;
        const [slot] = await f.source.query<{ retained: string; wal_status: string }>(
          `SELECT (pg_current_wal_lsn() - restart_lsn)::text AS retained, wal_status
             FROM pg_replication_slots WHERE slot_name = 'philotes_cdc'`,
        );
        const retained = sampleValue(
          all,
          'philotes_slot_retained_wal_bytes',
          `{source="${SOURCE_ID}"}`,
        );
        const status = sampleValue(
          all,
          'philotes_slot_wal_status',
          `{source="${SOURCE_ID}",status="${slot!.wal_status}"}`,
        );
        seen = `retained ${retained} (source: ${slot!.retained}), ${slot!.wal_status}: ${status}`;
        const agrees =
          retained !== undefined && retained >= 0 && retained <= Number(slot!.retained);
        return agrees && status === 1 && all;
      },
      { what: "the slot's retained WAL and status as the source reports them", timeoutMs: 60_000 },
    ).catch((err: unknown) => {
      throw new Error(`last seen: ${seen}`, { cause: err });
    });
    expect(
      samples.some((s) => s.name === 'philotes_build_info' && /version="0\.1\.0"/.test(s.labels)),
    ).toBe(true);
  });

  it('filters every dashboard query by the source variable', () => {
    const { panels, variables } = dashboardExpressions();
    for (const expr of panels) {
      // Each selector of one of our metrics (all carry `source`) names the variable.
      for (const m of expr.matchAll(/\b(philotes_[a-zA-Z0-9_:]*)(\{[^}]*\})?/g)) {
        if (isProcessWide(m[1]!)) continue;
        expect(m[2] ?? '', `${m[1]} in ${expr}`).toContain('source=~"$source"');
      }
      // The process-wide metrics have no source label: they are joined to the selected sources.
      if (metricNames(expr).some(isProcessWide))
        expect(expr).toMatch(/philotes_reader_up\{source=~"\$source"\}/);
    }
    expect(variables).toEqual(['label_values(philotes_reader_up, source)']);
  });

  it.skipIf(!HAS_PROMTOOL)('passes promtool check metrics for our own families', async () => {
    // prom-client's default nodejs_* metrics break promtool's naming rules (PITFALLS.md).
    const ours = (await scrape())
      .split('\n')
      .filter((l) => /^(# (HELP|TYPE) )?philotes_/.test(l))
      .join('\n');
    expect(ours).toContain('# TYPE philotes_events_total counter');
    const r = run('promtool', ['check', 'metrics'], `${ours}\n`);
    expect(r.output).toBe('');
    expect(r.status).toBe(0);
  });

  it.skipIf(!HAS_PROMTOOL)('passes promtool check rules and test rules', () => {
    const check = run('promtool', ['check', 'rules', RULES_FILE]);
    expect(check.status, check.output).toBe(0);
    const test = run('promtool', ['test', 'rules', RULES_TEST_FILE]);
    expect(test.status, test.output).toBe(0);
    expect(test.output).toContain('SUCCESS');
  });

  it.skipIf(!HAS_PROMTOOL)('has dashboard queries that parse as PromQL', () => {
    const { panels } = dashboardExpressions();
    const dir = mkdtempSync(join(tmpdir(), 'philotes-dash-'));
    try {
      const exprs = panels.map(substitute);
      for (const e of exprs) expect(e, 'an unknown Grafana variable').not.toContain('$');
      // promtool parses recording rules: one per query.
      const rules = exprs
        .map((e, i) => `      - record: dashboard_query_${i}\n        expr: ${JSON.stringify(e)}`)
        .join('\n');
      const file = join(dir, 'dashboard-queries.yml');
      writeFileSync(file, `groups:\n  - name: dashboard\n    rules:\n${rules}\n`);
      const r = run('promtool', ['check', 'rules', file]);
      expect(r.status, r.output).toBe(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  describe.skipIf(!HAS_PROMETHEUS)('with a Prometheus scraping Philotes', () => {
    let prometheus: ChildProcess | undefined;
    let promExited: Promise<void> | undefined;
    let promDir: string;
    let promBase: string;
    const promLog: string[] = [];

    beforeAll(async () => {
      promDir = mkdtempSync(join(tmpdir(), 'philotes-prom-'));
      const target = new URL(base).host;
      writeFileSync(
        join(promDir, 'prometheus.yml'),
        [
          'global: { scrape_interval: 1s, evaluation_interval: 1s }',
          `rule_files: [${JSON.stringify(RULES_FILE)}]`,
          'scrape_configs:',
          '  - job_name: philotes',
          `    static_configs: [{ targets: [${JSON.stringify(target)}] }]`,
          '',
        ].join('\n'),
      );
      const port = await freePort();
      promBase = `http://127.0.0.1:${port}`;
      const proc = spawn(
        'prometheus',
        [
          `--config.file=${join(promDir, 'prometheus.yml')}`,
          `--storage.tsdb.path=${join(promDir, 'data')}`,
          `--web.listen-address=127.0.0.1:${port}`,
          '--log.level=warn',
        ],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      prometheus = proc;
      onProcessEnd(() => proc.kill('SIGKILL'));
      promExited = new Promise((r) => proc.on('close', () => r()));
      proc.stdout?.on('data', (d: Buffer) => promLog.push(d.toString()));
      proc.stderr?.on('data', (d: Buffer) => promLog.push(d.toString()));
      await waitFor(async () => proc.exitCode !== null || (await fetch(`${promBase}/-/ready`)).ok, {
        what: 'prometheus to be ready',
        timeoutMs: 60_000,
      });
      expect(proc.exitCode, promLog.join('')).toBeNull();
    });

    afterAll(async () => {
      prometheus?.kill('SIGTERM');
      await promExited;
      if (promDir) rmSync(promDir, { recursive: true, force: true });
    });

    const query = async (expr: string): Promise<unknown[]> => {
      const url = `${promBase}/api/v1/query?query=${encodeURIComponent(expr)}`;
      const body = (await (await fetch(url)).json()) as {
        status: string;
        error?: string;
        data?: { result: unknown[] };
      };
      if (body.status !== 'success') throw new Error(`${expr}: ${body.error}`);
      return body.data?.result ?? [];
    };

    it('returns data for every dashboard query', async () => {
      const exprs = dashboardExpressions().panels.map(substitute);
      let empty: string[] = exprs;
      await waitFor(
        async () => {
          const results = await Promise.all(exprs.map(query));
          empty = exprs.filter((_, i) => results[i]!.length === 0);
          return empty.length === 0;
        },
        { what: 'every dashboard query to return data', timeoutMs: 90_000, intervalMs: 1000 },
      ).catch((err: unknown) => {
        throw new Error(`queries without data:\n${empty.join('\n')}\n${promLog.join('')}`, {
          cause: err,
        });
      });
      // Grafana's label_values(philotes_reader_up, source), as the API Grafana calls.
      const res = await fetch(`${promBase}/api/v1/label/source/values?match[]=philotes_reader_up`);
      expect(((await res.json()) as { data: string[] }).data).toEqual([SOURCE_ID]);
    });

    it('evaluates every alert rule without errors, and none fires for a healthy worker', async () => {
      type Rule = { name: string; health: string; lastError?: string; state: string };
      // The rules are read once Prometheus has scraped the worker and evaluated them since: an
      // evaluation before the first scrape sees no series at all (this test may run first).
      const upNow = async () =>
        ((await query('up{job="philotes"}')) as Array<{ value: [number, string] }>).map(
          (s) => s.value[1],
        );
      await waitFor(async () => (await upNow()).join() === '1', {
        what: 'prometheus to have scraped the worker',
        timeoutMs: 60_000,
      });
      const scraped = Date.now();
      const rules = await waitFor(
        async () => {
          const body = (await (await fetch(`${promBase}/api/v1/rules?type=alert`)).json()) as {
            data: { groups: Array<{ rules: Array<Rule & { lastEvaluation: string }> }> };
          };
          const all = body.data.groups.flatMap((g) => g.rules);
          const evaluated = all.every((r) => Date.parse(r.lastEvaluation) > scraped);
          return all.length > 0 && evaluated && all;
        },
        { what: 'every alert rule to be evaluated', timeoutMs: 60_000 },
      );
      expect(rules.map((r) => r.name).sort()).toEqual(
        [
          'PhilotesBufferDown',
          'PhilotesBufferLarge',
          'PhilotesConsumerExpired',
          'PhilotesConsumerFallingBehindRetention',
          'PhilotesGapRecorded',
          'PhilotesNoCommitStored',
          'PhilotesReaderDown',
          'PhilotesReaderRestarting',
          'PhilotesReplicationLagHigh',
          'PhilotesSlotRetainedWalHigh',
          'PhilotesSlotWalAtRisk',
          'PhilotesSourceFailed',
          'PhilotesSourceUnowned',
          'PhilotesTargetDown',
        ].sort(),
      );
      for (const r of rules) {
        expect({ name: r.name, health: r.health, error: r.lastError ?? '' }).toEqual({
          name: r.name,
          health: 'ok',
          error: '',
        });
        expect({ name: r.name, state: r.state }).toEqual({ name: r.name, state: 'inactive' });
      }
      // The target the rules watch is the worker, and it is up.
      expect(await upNow()).toEqual(['1']);
    });
  });
});
