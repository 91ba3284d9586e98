import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, parseDuration, type Config } from '../../src/common/config.js';

/** The least a valid environment needs: the required parts of both connections. */
const MINIMAL = {
  PHILOTES_CDC_SOURCE_DATABASE: 'app',
  PHILOTES_CDC_SOURCE_USER: 'cdc',
  PHILOTES_BUFFER_DATABASE: 'buffer',
  PHILOTES_BUFFER_USER: 'philotes',
} as const;

const SECRET = 'S3cr3t-pa55';

function load(env: Record<string, string | undefined>): Config {
  return loadConfig({ ...MINIMAL, ...env });
}

/** The ConfigError `fn` throws (fails the test if it throws anything else or nothing). */
function configError(fn: () => unknown): ConfigError {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return error as ConfigError;
  }
  throw new Error('expected a ConfigError, nothing was thrown');
}

function source(config: Config) {
  const first = config.sources[0];
  if (!first) throw new Error('no source');
  return first;
}

describe('loadConfig defaults', () => {
  it('applies the documented defaults', () => {
    const config = loadConfig(MINIMAL);
    const src = source(config);
    expect(config.sources).toHaveLength(1);
    expect(src.slot).toBe('philotes_cdc');
    expect(src.publication).toBe('philotes_pub');
    expect(src.id).toBe('philotes_cdc');
    expect(src.tables).toEqual([]);
    expect(src.connection).toEqual({
      host: 'localhost',
      port: 5432,
      database: 'app',
      user: 'cdc',
      password: undefined,
      sslmode: 'prefer',
      fromEnvironment: true,
    });
    expect(config.buffer).toEqual({
      host: 'localhost',
      port: 5432,
      database: 'buffer',
      user: 'philotes',
      password: undefined,
      sslmode: 'prefer',
      fromEnvironment: true,
    });
    expect(config.checkpointIntervalMs).toBe(10_000);
    expect(config.logLevel).toBe('info');
    expect(config.metricsPort).toBe(9753);
    expect(config.batchMaxRows).toBe(5000);
    // 0: a batch goes out as soon as the reader has caught up with the source.
    expect(config.batchMaxWaitMs).toBe(0);
    expect(loadConfig({ ...MINIMAL, PHILOTES_CDC_BATCH_MAX_WAIT: '50ms' }).batchMaxWaitMs).toBe(50);
  });

  it('defaults the source id to the slot name, whatever the slot is called', () => {
    const src = source(load({ PHILOTES_CDC_REPLICATION_SLOT: 'orders_slot' }));
    expect(src.slot).toBe('orders_slot');
    expect(src.id).toBe('orders_slot');
  });

  it('takes an explicit source id over the slot name', () => {
    expect(source(load({ PHILOTES_CDC_SOURCE_ID: 'shop-eu.1' })).id).toBe('shop-eu.1');
  });

  it('treats empty and blank values as unset', () => {
    const config = load({ PHILOTES_CDC_REPLICATION_SLOT: '', PHILOTES_LOG_LEVEL: '   ' });
    expect(source(config).slot).toBe('philotes_cdc');
    expect(config.logLevel).toBe('info');
  });

  it('returns a frozen configuration', () => {
    const config = loadConfig(MINIMAL);
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.sources)).toBe(true);
    expect(Object.isFrozen(source(config))).toBe(true);
    expect(Object.isFrozen(source(config).connection)).toBe(true);
    expect(Object.isFrozen(config.buffer)).toBe(true);
  });

  it('parses PHILOTES_CDC_TABLES into a list', () => {
    const src = source(load({ PHILOTES_CDC_TABLES: ' public.orders, customers ,,shop.items' }));
    expect(src.tables).toEqual(['public.orders', 'customers', 'shop.items']);
  });
});

describe('durations', () => {
  it.each([
    ['500ms', 500],
    ['10s', 10_000],
    ['1m', 60_000],
    ['1h', 3_600_000],
    ['1.5s', 1_500],
    ['2', 2_000], // no unit: seconds
    [' 250ms ', 250], // surrounding blanks are trimmed
  ])('PHILOTES_CDC_CHECKPOINT_INTERVAL=%j is %d ms', (raw, ms) => {
    expect(load({ PHILOTES_CDC_CHECKPOINT_INTERVAL: raw }).checkpointIntervalMs).toBe(ms);
  });

  it.each(['ten seconds', '10 sec', '-1s', '1w', '1S', 's', ''])(
    'parseDuration rejects %j with the variable name',
    (raw) => {
      const error = configError(() => parseDuration('PHILOTES_CDC_CHECKPOINT_INTERVAL', raw));
      expect(error.message).toBe(
        `PHILOTES_CDC_CHECKPOINT_INTERVAL must be a duration like 500ms, 10s, 1m, 2h or 7d, got ${JSON.stringify(raw)}`,
      );
    },
  );

  it('names the variable for a malformed duration', () => {
    const error = configError(() => load({ PHILOTES_CDC_CHECKPOINT_INTERVAL: 'soon' }));
    expect(error.message).toBe(
      'PHILOTES_CDC_CHECKPOINT_INTERVAL must be a duration like 500ms, 10s, 1m, 2h or 7d, got "soon"',
    );
  });

  it('rejects durations outside the allowed range', () => {
    expect(configError(() => load({ PHILOTES_CDC_CHECKPOINT_INTERVAL: '0s' })).message).toBe(
      'PHILOTES_CDC_CHECKPOINT_INTERVAL must be between 10ms and 1h, got "0s"',
    );
    expect(configError(() => load({ PHILOTES_CDC_CHECKPOINT_INTERVAL: '2h' })).message).toBe(
      'PHILOTES_CDC_CHECKPOINT_INTERVAL must be between 10ms and 1h, got "2h"',
    );
    expect(load({ PHILOTES_CDC_CHECKPOINT_INTERVAL: '10ms' }).checkpointIntervalMs).toBe(10);
    expect(load({ PHILOTES_CDC_CHECKPOINT_INTERVAL: '60m' }).checkpointIntervalMs).toBe(3_600_000);
  });
});

describe('connection URLs', () => {
  it('reads every part of PHILOTES_CDC_SOURCE_URL', () => {
    const config = loadConfig({
      PHILOTES_CDC_SOURCE_URL: 'postgres://u:p@h:6543/db?sslmode=require',
      PHILOTES_BUFFER_DATABASE: 'buffer',
      PHILOTES_BUFFER_USER: 'philotes',
    });
    expect(source(config).connection).toEqual({
      host: 'h',
      port: 6543,
      database: 'db',
      user: 'u',
      password: 'p',
      sslmode: 'require',
      // Which setting gave the password, for the error that a wrong one gets.
      passwordSetting: 'PHILOTES_CDC_SOURCE_URL',
      fromEnvironment: true,
    });
  });

  it('accepts the postgresql:// scheme and PHILOTES_BUFFER_URL', () => {
    const config = loadConfig({
      PHILOTES_CDC_SOURCE_DATABASE: 'app',
      PHILOTES_CDC_SOURCE_USER: 'cdc',
      PHILOTES_BUFFER_URL: 'postgresql://bufuser:bufpw@buffer.internal/cdc_buffer',
    });
    expect(config.buffer).toEqual({
      host: 'buffer.internal',
      port: 5432,
      database: 'cdc_buffer',
      user: 'bufuser',
      password: 'bufpw',
      sslmode: 'prefer',
      passwordSetting: 'PHILOTES_BUFFER_URL',
      fromEnvironment: true,
    });
  });

  it('lets individual variables override parts of the URL', () => {
    const conn = source(
      loadConfig({
        ...MINIMAL,
        PHILOTES_CDC_SOURCE_URL: 'postgres://u:p@h:6543/db?sslmode=require',
        PHILOTES_CDC_SOURCE_HOST: 'other-host',
        PHILOTES_CDC_SOURCE_PORT: '7000',
        PHILOTES_CDC_SOURCE_DATABASE: 'otherdb',
        PHILOTES_CDC_SOURCE_USER: 'otheruser',
        PHILOTES_CDC_SOURCE_PASSWORD: 'otherpw',
        PHILOTES_CDC_SOURCE_SSLMODE: 'disable',
      }),
    ).connection;
    expect(conn).toEqual({
      host: 'other-host',
      port: 7000,
      database: 'otherdb',
      user: 'otheruser',
      password: 'otherpw',
      sslmode: 'disable',
      passwordSetting: 'PHILOTES_CDC_SOURCE_PASSWORD',
      fromEnvironment: true,
    });
  });

  it('keeps the URL parts no variable overrides', () => {
    const conn = source(
      loadConfig({
        PHILOTES_BUFFER_DATABASE: 'buffer',
        PHILOTES_BUFFER_USER: 'philotes',
        PHILOTES_CDC_SOURCE_URL: 'postgres://u:p@h:6543/db',
        PHILOTES_CDC_SOURCE_PORT: '7000',
      }),
    ).connection;
    expect(conn).toMatchObject({ host: 'h', port: 7000, database: 'db', user: 'u', password: 'p' });
  });

  it('decodes percent-encoded user, password and database', () => {
    const conn = source(
      loadConfig({
        ...MINIMAL,
        PHILOTES_CDC_SOURCE_URL:
          'postgres://app%40corp:p%40ss%3Aw%2Fo%25rd%20x@db.example.com:5433/my%20db',
        PHILOTES_CDC_SOURCE_DATABASE: undefined,
        PHILOTES_CDC_SOURCE_USER: undefined,
      }),
    ).connection;
    expect(conn.user).toBe('app@corp');
    expect(conn.password).toBe('p@ss:w/o%rd x');
    expect(conn.database).toBe('my db');
    expect(conn.host).toBe('db.example.com');
    expect(conn.port).toBe(5433);
  });

  it('unwraps an IPv6 host and takes a socket directory from ?host=', () => {
    const v6 = source(load({ PHILOTES_CDC_SOURCE_URL: 'postgres://u:p@[::1]:5432/db' })).connection;
    expect(v6.host).toBe('::1');
    const socket = source(
      load({ PHILOTES_CDC_SOURCE_URL: 'postgres:///db?host=/var/run/postgresql' }),
    ).connection;
    expect(socket).toMatchObject({ host: '/var/run/postgresql', database: 'app', user: 'cdc' });
    expect(socket.password).toBeUndefined();
    // ?host= wins over the URL's host name.
    const both = source(
      loadConfig({
        ...MINIMAL,
        PHILOTES_CDC_SOURCE_DATABASE: undefined,
        PHILOTES_CDC_SOURCE_URL: 'postgres://u:p@ignored/db?host=/tmp/sock',
      }),
    ).connection;
    expect(both).toMatchObject({ host: '/tmp/sock', database: 'db' });
  });

  it('takes the password variable verbatim (no trimming)', () => {
    const conn = source(load({ PHILOTES_CDC_SOURCE_PASSWORD: ' pw with spaces ' })).connection;
    expect(conn.password).toBe(' pw with spaces ');
  });

  it('requires database and user when the URL does not give them', () => {
    expect(
      configError(() => loadConfig({ ...MINIMAL, PHILOTES_CDC_SOURCE_DATABASE: undefined }))
        .message,
    ).toBe('PHILOTES_CDC_SOURCE_DATABASE is required (or set PHILOTES_CDC_SOURCE_URL)');
    expect(
      configError(() =>
        loadConfig({
          ...MINIMAL,
          PHILOTES_CDC_SOURCE_URL: 'postgres://h/db',
          PHILOTES_CDC_SOURCE_USER: undefined,
        }),
      ).message,
    ).toBe('PHILOTES_CDC_SOURCE_USER is required (or set PHILOTES_CDC_SOURCE_URL)');
    expect(
      configError(() => loadConfig({ ...MINIMAL, PHILOTES_BUFFER_USER: undefined })).message,
    ).toBe('PHILOTES_BUFFER_USER is required (or set PHILOTES_BUFFER_URL)');
  });
});

describe('sslmode', () => {
  it.each(['disable', 'prefer', 'require', 'verify-ca', 'verify-full'] as const)(
    'accepts %s from the variable and from the URL',
    (mode) => {
      expect(source(load({ PHILOTES_CDC_SOURCE_SSLMODE: mode })).connection.sslmode).toBe(mode);
      expect(
        load({ PHILOTES_BUFFER_URL: `postgres://u:p@h/db?sslmode=${mode}` }).buffer.sslmode,
      ).toBe(mode);
    },
  );

  it('rejects an unknown sslmode variable, naming it', () => {
    expect(configError(() => load({ PHILOTES_CDC_SOURCE_SSLMODE: 'allow' })).message).toBe(
      'PHILOTES_CDC_SOURCE_SSLMODE must be one of disable, prefer, require, verify-ca, verify-full, got "allow"',
    );
  });

  it('rejects an unknown sslmode in the URL without echoing the URL', () => {
    const error = configError(() =>
      load({ PHILOTES_BUFFER_URL: `postgres://u:${SECRET}@h/db?sslmode=always` }),
    );
    expect(error.message).toBe(
      'PHILOTES_BUFFER_URL sslmode must be one of disable, prefer, require, verify-ca, verify-full, got "always"',
    );
    expect(error.message).not.toContain(SECRET);
  });
});

describe('error messages name the variable', () => {
  it.each([
    [
      { PHILOTES_CDC_SOURCE_PORT: '70000' },
      'PHILOTES_CDC_SOURCE_PORT must be an integer between 1 and 65535, got "70000"',
    ],
    [
      { PHILOTES_BUFFER_PORT: 'abc' },
      'PHILOTES_BUFFER_PORT must be an integer between 1 and 65535, got "abc"',
    ],
    [
      { PHILOTES_CDC_SOURCE_PORT: '0' },
      'PHILOTES_CDC_SOURCE_PORT must be an integer between 1 and 65535, got "0"',
    ],
    [
      { PHILOTES_CDC_REPLICATION_SLOT: 'My-Slot' },
      'PHILOTES_CDC_REPLICATION_SLOT must match /^[a-z_][a-z0-9_]{0,62}$/ (lower-case letters, digits, underscore), got "My-Slot"',
    ],
    [
      { PHILOTES_CDC_PUBLICATION: 'pub"; DROP TABLE x; --' },
      'PHILOTES_CDC_PUBLICATION must match /^[a-z_][a-z0-9_]{0,62}$/ (lower-case letters, digits, underscore), got "pub\\"; DROP TABLE x; --"',
    ],
    [
      { PHILOTES_CDC_SOURCE_ID: 'has space' },
      `PHILOTES_CDC_SOURCE_ID must be 1-128 characters of letters, digits, '_', '.' or '-', got "has space"`,
    ],
    [
      { PHILOTES_CDC_TABLES: 'public.orders,bad-name' },
      'PHILOTES_CDC_TABLES must be a comma-separated list of tables like public.orders, got "bad-name"',
    ],
    [
      { PHILOTES_LOG_LEVEL: 'verbose' },
      'PHILOTES_LOG_LEVEL must be one of fatal, error, warn, info, debug, trace, silent, got "verbose"',
    ],
    [
      { PHILOTES_METRICS_PORT: '-1' },
      'PHILOTES_METRICS_PORT must be an integer between 0 and 65535, got "-1"',
    ],
    [
      { PHILOTES_CDC_BATCH_MAX_WAIT: '2m' },
      'PHILOTES_CDC_BATCH_MAX_WAIT must be between 0ms and 1m, got "2m"',
    ],
    [
      { PHILOTES_CDC_BATCH_MAX_ROWS: '0' },
      'PHILOTES_CDC_BATCH_MAX_ROWS must be an integer between 1 and 1000000, got "0"',
    ],
    [
      { PHILOTES_RESTART_MIN_DELAY: '10s', PHILOTES_RESTART_MAX_DELAY: '1s' },
      'PHILOTES_RESTART_MAX_DELAY must not be less than PHILOTES_RESTART_MIN_DELAY',
    ],
  ])('%j', (env, message) => {
    expect(configError(() => load(env)).message).toBe(message);
  });

  it('a slot name is at most 63 characters', () => {
    expect(source(load({ PHILOTES_CDC_REPLICATION_SLOT: 'a'.repeat(63) })).slot).toHaveLength(63);
    expect(() => load({ PHILOTES_CDC_REPLICATION_SLOT: 'a'.repeat(64) })).toThrow(ConfigError);
  });
});

describe('passwords never appear in error messages', () => {
  const malformedUrls = [
    // Not a URL at all.
    `postgres//admin:${SECRET}@db.internal:5432/app`,
    // Port out of range / not a number.
    `postgres://admin:${SECRET}@db.internal:99999/app`,
    `postgres://admin:${SECRET}@db.internal:port/app`,
    // A space in the host.
    `postgres://admin:${SECRET}@db internal/app`,
    // Wrong scheme.
    `mysql://admin:${SECRET}@db.internal/app`,
    `http://admin:${SECRET}@db.internal/app`,
    // Port 0 parses but is refused.
    `postgres://admin:${SECRET}@db.internal:0/app`,
  ];

  it.each(malformedUrls)('PHILOTES_CDC_SOURCE_URL=%s', (url) => {
    const error = configError(() => load({ PHILOTES_CDC_SOURCE_URL: url }));
    expect(error.message).toMatch(/^PHILOTES_CDC_SOURCE_URL /);
    expect(error.message).not.toContain(SECRET);
    expect(error.message).not.toContain(url);
  });

  it.each(malformedUrls)('PHILOTES_BUFFER_URL=%s', (url) => {
    const error = configError(() => load({ PHILOTES_BUFFER_URL: url }));
    expect(error.message).toMatch(/^PHILOTES_BUFFER_URL /);
    expect(error.message).not.toContain(SECRET);
  });

  it('exact messages for a malformed URL, a wrong scheme and a bad URL port', () => {
    expect(
      configError(() => load({ PHILOTES_CDC_SOURCE_URL: `postgres//u:${SECRET}@h/db` })).message,
    ).toBe(
      'PHILOTES_CDC_SOURCE_URL is not a valid URL (expected postgres://user:password@host:port/database)',
    );
    expect(
      configError(() => load({ PHILOTES_CDC_SOURCE_URL: `mysql://u:${SECRET}@h/db` })).message,
    ).toBe('PHILOTES_CDC_SOURCE_URL must start with postgres:// or postgresql://');
    expect(
      configError(() => load({ PHILOTES_CDC_SOURCE_URL: `postgres://u:${SECRET}@h:0/db` })).message,
    ).toBe(
      'PHILOTES_CDC_SOURCE_URL has an invalid port: it must be an integer between 1 and 65535',
    );
  });

  it('a password never leaks through any other failing variable', () => {
    const envs = [
      { PHILOTES_CDC_SOURCE_PASSWORD: SECRET, PHILOTES_CDC_SOURCE_PORT: 'x' },
      { PHILOTES_BUFFER_PASSWORD: SECRET, PHILOTES_BUFFER_SSLMODE: 'x' },
      { PHILOTES_CDC_SOURCE_PASSWORD: SECRET, PHILOTES_CDC_SOURCE_DATABASE: undefined },
      { PHILOTES_BUFFER_PASSWORD: SECRET, PHILOTES_LOG_LEVEL: 'x' },
    ];
    for (const env of envs) {
      const error = configError(() => load(env));
      expect(error.message).not.toContain(SECRET);
    }
  });

  // A stray '%' must be a ConfigError naming the variable (exit 2), not a bare URIError.
  it.each([
    `postgres://admin:50%off${SECRET}@db.internal/app`,
    `postgres://adm%in:${SECRET}@db.internal/app`,
    `postgres://admin:${SECRET}@db.internal/app%zz`,
  ])('a stray %% in %s is a ConfigError naming the variable', (url) => {
    const error = configError(() => load({ PHILOTES_CDC_SOURCE_URL: url }));
    expect(error.message).toMatch(/^PHILOTES_CDC_SOURCE_URL /);
    expect(error.message).not.toContain(SECRET);
  });
});

describe('sslrootcert', () => {
  it('reads the CA file named by _SSLROOTCERT or the URL, for verify-ca/verify-full', () => {
    const dir = mkdtempSync(join(tmpdir(), 'philotes-ca-'));
    const file = join(dir, 'ca.pem');
    writeFileSync(file, '-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n');
    try {
      const viaVar = load({
        PHILOTES_CDC_SOURCE_SSLMODE: 'verify-full',
        PHILOTES_CDC_SOURCE_SSLROOTCERT: file,
      });
      expect(viaVar.sources[0]!.connection.sslRootCert).toContain('BEGIN CERTIFICATE');
      const viaUrl = load({
        PHILOTES_CDC_SOURCE_URL: `postgres://u:p@h/db?sslmode=verify-ca&sslrootcert=${encodeURIComponent(file)}`,
      });
      expect(viaUrl.sources[0]!.connection.sslRootCert).toContain('BEGIN CERTIFICATE');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a missing CA file stops start-up naming the variable', () => {
    const error = configError(() => load({ PHILOTES_BUFFER_SSLROOTCERT: '/nonexistent/ca.pem' }));
    expect(error.message).toBe(
      'PHILOTES_BUFFER_SSLROOTCERT cannot be read: ENOENT /nonexistent/ca.pem',
    );
  });
});

describe('no configuration at all', () => {
  it('says how to configure, naming --config, instead of the first missing variable', () => {
    const error = configError(() => loadConfig({ HOME: '/root', PATH: '/usr/bin' }));
    expect(error.problems).toHaveLength(1);
    expect(error.problems[0]).toMatch(/^no configuration: give a file with --config <path>/);
    expect(error.problems[0]).toContain('PHILOTES_CDC_SOURCE_URL');
  });
});
