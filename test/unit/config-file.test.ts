/**
 * The configuration file: many sources, defaults, passwords from variables and files, and every
 * mistake reported at once with its path, never a secret.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, type Config } from '../../src/common/config.js';

const dir = mkdtempSync(join(tmpdir(), 'philotes-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
function file(text: string, ext = 'yaml'): string {
  const path = join(dir, `config-${n++}.${ext}`);
  writeFileSync(path, text);
  return path;
}

const SECRET = 'Sup3r-s3cret-pw';

function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return [...(error as ConfigError).problems];
  }
  throw new Error('expected a ConfigError');
}

const FLEET = `
buffer:
  url: postgres://philotes@buffer.internal:5432/cdc_buffer
  passwordFile: ${join(dir, 'buffer-password')}
defaults:
  checkpointInterval: 5s
  batchMaxRows: 1000
logLevel: warn
metricsPort: 9900
sources:
  - id: orders
    host: 10.0.0.5
    port: 5432
    database: orders
    user: cdc
    passwordEnv: ORDERS_PASSWORD
    slot: philotes_orders
    publication: philotes_pub
    tables: [public.orders, public.order_lines]
  - id: billing
    url: postgres://cdc@10.0.0.6:5432/billing?sslmode=require
    slot: philotes_billing
    checkpointInterval: 1m
    batchMaxWait: 20ms
`;

describe('config file', () => {
  writeFileSync(join(dir, 'buffer-password'), `${SECRET}\n`);

  it('reads many sources, defaults, per-source settings and passwords from variables and files', () => {
    const config = loadConfig({ ORDERS_PASSWORD: 'orders-pw' }, file(FLEET));
    expect(config.origin).toEqual({ file: expect.stringMatching(/config-\d+\.yaml$/) });
    expect(config.buffer).toMatchObject({
      host: 'buffer.internal',
      database: 'cdc_buffer',
      user: 'philotes',
      password: SECRET, // the file's trailing newline is not part of it
    });
    expect(config.sources.map((s) => s.id)).toEqual(['orders', 'billing']);
    const [orders, billing] = config.sources as [Config['sources'][0], Config['sources'][0]];
    expect(orders).toMatchObject({
      slot: 'philotes_orders',
      publication: 'philotes_pub',
      tables: ['public.orders', 'public.order_lines'],
      connection: { host: '10.0.0.5', port: 5432, database: 'orders', password: 'orders-pw' },
      settings: { checkpointIntervalMs: 5_000, batchMaxRows: 1000, batchMaxWaitMs: 0 },
    });
    expect(billing).toMatchObject({
      publication: 'philotes_pub',
      connection: { host: '10.0.0.6', database: 'billing', sslmode: 'require' },
      settings: { checkpointIntervalMs: 60_000, batchMaxRows: 1000, batchMaxWaitMs: 20 },
    });
    expect(config.logLevel).toBe('warn');
    expect(config.metricsPort).toBe(9900);
  });

  it('reads JSON too, and takes PHILOTES_CONFIG when --config is not given', () => {
    const path = file(
      JSON.stringify({
        buffer: { url: 'postgres://u@b/buf' },
        sources: [{ id: 'a', url: 'postgres://u@s/app', slot: 'slot_a' }],
      }),
      'json',
    );
    const config = loadConfig({ PHILOTES_CONFIG: path });
    expect(config.sources[0]).toMatchObject({ id: 'a', slot: 'slot_a' });
    expect(config.sources[0]!.settings.checkpointIntervalMs).toBe(10_000);
  });

  it('lets the environment override process-wide settings and supply the buffer', () => {
    const path = file(`
metricsPort: 9900
sources:
  - { id: a, url: "postgres://u@s/app", slot: slot_a }
`);
    const config = loadConfig(
      { PHILOTES_METRICS_PORT: '9100', PHILOTES_BUFFER_URL: 'postgres://u@b/buf' },
      path,
    );
    expect(config.metricsPort).toBe(9100);
    expect(config.buffer.database).toBe('buf');
  });

  it('reports every mistake at once, each with its path, and never a secret', () => {
    const path = file(`
buffer:
  url: postgres://philotes:${SECRET}@buffer/cdc
defaults:
  checkpointInterval: soon
sources:
  - id: orders
    url: postgres://cdc:${SECRET}@db1/orders
    slot: Orders
    slto: oops
  - id: b
    url: postgres://cdc@db1/orders
    slot: philotes_b
  - url: postgres://cdc@db2/x
    slot: philotes_c
  - id: d
    url: postgres://cdc@db1/orders
    slot: philotes_d
    passwordEnv: NOT_SET_ANYWHERE
    batchMaxRows: -5
  - id: e
    url: postgres://cdc@db1/orders
    slot: philotes_b
logLevel: loud
shutdownTimout: 5s
`);
    const list = problems(() =>
      loadConfig({ PHILOTES_CDC_SOURCE_URL: `postgres://x:${SECRET}@h/d` }, path),
    );
    const all = list.join('\n');
    expect(all).not.toContain(SECRET);
    const expected = [
      /PHILOTES_CDC_SOURCE_URL is set together with the config file/,
      /^sources\[0\]\.slto: unknown key \(did you mean "slot"\?\)$/,
      /^shutdownTimout: unknown key \(did you mean "shutdownTimeout"\?\)$/,
      /^sources\[2\]\.id is required$/,
      /^sources\[0\]\.slot must match .*got "Orders"$/,
      /^defaults\.checkpointInterval must be a duration/,
      /^sources\[3\]\.passwordEnv: the environment variable NOT_SET_ANYWHERE is not set$/,
      /^sources\[3\]\.batchMaxRows must be an integer/,
      /^logLevel must be one of/,
      /^sources\[4\]\.slot: sources\[1\] already reads slot "philotes_b" on db1:5432\/orders/,
    ];
    for (const pattern of expected) {
      expect(
        list.some((p) => pattern.test(p)),
        `${pattern} in:\n${all}`,
      ).toBe(true);
    }
  });

  it('rejects duplicate ids', () => {
    const list = problems(() =>
      loadConfig(
        {},
        file(`
buffer: { url: "postgres://u@b/buf" }
sources:
  - { id: a, url: "postgres://u@s1/app", slot: slot_a }
  - { id: a, url: "postgres://u@s2/app", slot: slot_a }
`),
      ),
    );
    expect(list).toEqual([
      'sources[1].id: "a" is already the id of sources[0]; ids must be unique',
    ]);
  });

  it('a file that cannot be read or parsed says so with its path', () => {
    expect(problems(() => loadConfig({}, join(dir, 'missing.yaml')))).toEqual([
      `the config file ${join(dir, 'missing.yaml')} cannot be read: ENOENT`,
    ]);
    const broken = file('sources: [\n  { id: a, slot: b\n');
    const [line] = problems(() => loadConfig({}, broken));
    expect(line).toMatch(/is not valid YAML or JSON/);
  });

  it('wants at least one source, and says which setting is missing', () => {
    expect(
      problems(() => loadConfig({}, file('buffer: { url: "postgres://u@b/buf" }\nsources: []\n'))),
    ).toEqual(['sources: must list at least one source']);
    expect(
      problems(() =>
        loadConfig(
          {},
          file('buffer: { url: "postgres://u@b/buf" }\nsources:\n  - { id: a, slot: s }\n'),
        ),
      ),
    ).toEqual(['sources[0].database is required (or set sources[0].url)']);
  });

  it('the example file that ships in the repo is valid', () => {
    const secrets = join(dir, 'secret');
    writeFileSync(secrets, 'pw\n');
    const example = readFileSync(new URL('../../philotes.example.yaml', import.meta.url), 'utf8')
      .replaceAll('/run/secrets/buffer-password', secrets)
      .replaceAll('/run/secrets/billing-password', secrets);
    const config = loadConfig({ ORDERS_PASSWORD: 'pw' }, file(example));
    expect(config.sources.map((s) => s.id)).toEqual(['orders', 'billing']);
    expect(config.sources[1]!.settings.checkpointIntervalMs).toBe(5_000);
  });

  it('reads the buffer writer settings, as booleans or words, and rejects bad ones with their keys', () => {
    const base =
      'buffer: { url: "postgres://u@b/buf" }\nsources:\n  - { id: a, url: "postgres://u@s/app", slot: slot_a }\n';
    const defaults = loadConfig({}, file(base));
    expect([defaults.commitCoalesce, defaults.commitWriters, defaults.maxBytesInFlight]).toEqual([
      true,
      2,
      128 * 1024 * 1024,
    ]);
    const set = loadConfig(
      {},
      file(`commitCoalesce: false\ncommitWriters: 8\nmaxBytesInFlight: 1048576\n${base}`),
    );
    expect([set.commitCoalesce, set.commitWriters, set.maxBytesInFlight]).toEqual([
      false,
      8,
      1048576,
    ]);
    expect(loadConfig({ PHILOTES_COMMIT_COALESCE: 'off' }, file(base)).commitCoalesce).toBe(false);
    expect(
      problems(() =>
        loadConfig(
          {},
          file(`commitCoalesce: sometimes\ncommitWriters: 0\nmaxBytesInFlight: 10\n${base}`),
        ),
      ),
    ).toEqual([
      'commitCoalesce must be on or off (true/false), got "sometimes"',
      'commitWriters must be an integer between 1 and 64, got "0"',
      'maxBytesInFlight must be an integer between 1048576 and 68719476736, got "10"',
    ]);
  });

  it('partitionRoot: true by default, false when set, and nothing but a boolean', () => {
    const entry = (extra: string) =>
      file(
        `buffer: { url: "postgres://u@b/buf" }\nsources:\n  - { id: a, url: "postgres://u@s/app", slot: slot_a${extra} }\n`,
      );
    expect(loadConfig({}, entry('')).sources[0]!.partitionRoot).toBe(true);
    expect(loadConfig({}, entry(', partitionRoot: false')).sources[0]!.partitionRoot).toBe(false);
    expect(problems(() => loadConfig({}, entry(', partitionRoot: sometimes')))).toEqual([
      'sources[0].partitionRoot must be on or off (true/false), got "sometimes"',
    ]);
    expect(
      loadConfig({
        PHILOTES_CDC_SOURCE_DATABASE: 'app',
        PHILOTES_CDC_SOURCE_USER: 'cdc',
        PHILOTES_BUFFER_DATABASE: 'buf',
        PHILOTES_BUFFER_USER: 'u',
        PHILOTES_CDC_PARTITION_ROOT: 'off',
      }).sources[0]!.partitionRoot,
    ).toBe(false);
  });

  it('ddl: off by default; protocol: 1, 2 or auto (null), in the file and the environment', () => {
    const entry = (extra: string) =>
      file(
        `buffer: { url: "postgres://u@b/buf" }\nsources:\n  - { id: a, url: "postgres://u@s/app", slot: slot_a${extra} }\n`,
      );
    const a = loadConfig({}, entry('')).sources[0]!;
    expect([a.ddl, a.protocol]).toEqual([false, null]);
    const b = loadConfig({}, entry(', ddl: true, protocol: 1')).sources[0]!;
    expect([b.ddl, b.protocol]).toEqual([true, 1]);
    expect(loadConfig({}, entry(', protocol: auto')).sources[0]!.protocol).toBe(null);
    expect(problems(() => loadConfig({}, entry(', ddl: maybe, protocol: 3')))).toEqual([
      'sources[0].ddl must be on or off (true/false), got "maybe"',
      'sources[0].protocol must be 1, 2 or auto, got "3"',
    ]);
    const env = {
      PHILOTES_CDC_SOURCE_DATABASE: 'app',
      PHILOTES_CDC_SOURCE_USER: 'cdc',
      PHILOTES_BUFFER_DATABASE: 'buf',
      PHILOTES_BUFFER_USER: 'u',
    };
    const c = loadConfig({ ...env, PHILOTES_CDC_DDL: 'on', PHILOTES_CDC_PROTOCOL: '2' })
      .sources[0]!;
    expect([c.ddl, c.protocol]).toEqual([true, 2]);
  });

  it('snapshot: initial by default, per source or under defaults, and nothing but a mode', () => {
    const conf = (defaults: string, extra: string) =>
      file(
        `buffer: { url: "postgres://u@b/buf" }\n${defaults}sources:\n  - { id: a, url: "postgres://u@s/app", slot: slot_a${extra} }\n  - { id: b, url: "postgres://u@s/app2", slot: slot_b }\n`,
      );
    const modes = (c: ReturnType<typeof loadConfig>) => c.sources.map((s) => s.snapshot);
    expect(modes(loadConfig({}, conf('', '')))).toEqual(['initial', 'initial']);
    expect(modes(loadConfig({}, conf('defaults: { snapshot: never }\n', '')))).toEqual([
      'never',
      'never',
    ]);
    expect(
      modes(loadConfig({}, conf('defaults: { snapshot: never }\n', ', snapshot: when_needed'))),
    ).toEqual(['when_needed', 'never']);
    expect(
      problems(() => loadConfig({}, conf('defaults: { snapshot: sometimes }\n', ', snapshot: 1'))),
    ).toEqual([
      'defaults.snapshot must be initial, never or when_needed, got "sometimes"',
      'sources[0].snapshot must be initial, never or when_needed, got "1"',
    ]);
  });

  it('the buffer is set in one place only', () => {
    const list = problems(() =>
      loadConfig(
        { PHILOTES_BUFFER_HOST: 'other' },
        file(`
buffer: { url: "postgres://u@b/buf" }
sources:
  - { id: a, url: "postgres://u@s/app", slot: slot_a }
`),
      ),
    );
    expect(list).toEqual([
      'the buffer is set twice: in the config file (buffer:) and by PHILOTES_BUFFER_HOST; keep one',
    ]);
  });
});

describe('problem lines', () => {
  it('two unknown keys at one level are two problems, one a line', () => {
    const path = file(`
sources:
  - id: a
    url: postgres://cdc@db1/orders
    slot: philotes_a
    checkpointIntervalMs: 5s
    sourceTimeoutMs: 5s
`);
    const list = problems(() => loadConfig({}, path));
    expect(list).toContain(
      'sources[0].checkpointIntervalMs: unknown key (did you mean "checkpointInterval"?)',
    );
    expect(list).toContain(
      'sources[0].sourceTimeoutMs: unknown key (did you mean "sourceTimeout"?)',
    );
    expect(list.every((line) => !line.includes('\n'))).toBe(true);
  });
});
