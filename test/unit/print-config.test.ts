/**
 * print-config prints a file that --config accepts as it is, equal in effect to what it was
 * given: loading its output with the same environment gives the same configuration, setting for
 * setting, with no secret in it.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { loadConfig, type Config, type Env } from '../../src/common/config.js';
import { printableConfig } from '../../src/commands/print-config.js';

const dir = mkdtempSync(join(tmpdir(), 'philotes-print-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** What a configuration does: everything but where it and its secrets were read from. */
const BOOKKEEPING = new Set([
  'origin',
  'configFile',
  'passwordSetting',
  'passwordEnv',
  'fromEnvironment',
]);
function effect(config: Config): unknown {
  return JSON.parse(
    JSON.stringify(config, (key, value: unknown) => (BOOKKEEPING.has(key) ? undefined : value)),
  ) as unknown;
}

function roundTrip(config: Config, env: Env): { again: Config; text: string; notes: string[] } {
  const printed = printableConfig(config);
  const text = stringify(printed.document);
  const path = join(dir, `printed-${Math.random().toString(36).slice(2, 8)}.yaml`);
  writeFileSync(path, text);
  return { again: loadConfig(env, path), text, notes: [...printed.notes] };
}

describe('print-config round-trips', () => {
  it('a file with two sources, every kind of setting and both kinds of secret reference', () => {
    const secret = join(dir, 'billing-password');
    writeFileSync(secret, 'billing-secret\n');
    const file = join(dir, 'fleet.yaml');
    writeFileSync(
      file,
      [
        'buffer: { url: "postgres://philotes@buffer.internal:6432/buffer?sslmode=require", passwordEnv: BUF_PW }',
        'metricsPort: 9900',
        'restartMaxDelay: 2m',
        'commitCoalesce: false',
        'defaults: { checkpointInterval: 5s, snapshot: never, keylessTables: leave_out }',
        'sources:',
        '  - id: orders',
        '    url: postgres://cdc@10.0.0.5:5432/orders',
        '    passwordEnv: ORDERS_PW',
        '    slot: philotes_orders',
        '    publication: orders_pub',
        '    tables: [public.orders, public.lines]',
        '    partitionRoot: false',
        '    messages: [outbox, "a,b"]',
        '    ddl: true',
        '    protocol: 1',
        '    batchMaxRows: 500',
        '  - id: billing',
        '    host: 10.0.0.6',
        '    database: billing',
        '    user: cdc',
        `    passwordFile: ${secret}`,
        '    slot: philotes_billing',
        '    snapshot: when_needed',
        '    checkpointInterval: 1500ms',
      ].join('\n'),
    );
    const env = { BUF_PW: 'buffer-secret', ORDERS_PW: 'orders-secret' };
    const config = loadConfig(env, file);
    const { again, text, notes } = roundTrip(config, env);
    expect(effect(again)).toEqual(effect(config));
    expect(notes).toEqual([]);
    for (const value of ['buffer-secret', 'orders-secret', 'billing-secret'])
      expect(text).not.toContain(value);
    expect(text).toContain('passwordEnv: ORDERS_PW');
    expect(text).toContain(`passwordFile: ${secret}`);
    expect(text).toContain('checkpointInterval: 1500ms');
  });

  it('an inline password becomes a variable to set, said in a note, and then runs the same', () => {
    const file = join(dir, 'inline.yaml');
    writeFileSync(
      file,
      [
        'buffer: { host: b, database: buffer, user: p, password: inline-buffer }',
        'sources:',
        '  - { id: shop-eu, host: s, database: shop, user: cdc, password: inline-shop, slot: philotes_shop }',
      ].join('\n'),
    );
    const config = loadConfig({}, file);
    const printed = printableConfig(config);
    const text = stringify(printed.document);
    expect(text).not.toContain('inline-');
    expect(printed.notes).toEqual([
      'set BUFFER_PASSWORD to the password of buffer (it was given in buffer.password; print-config never prints a secret)',
      'set SOURCE_SHOP_EU_PASSWORD to the password of source shop-eu (it was given in sources[0].password; print-config never prints a secret)',
    ]);
    const { again } = roundTrip(config, {
      BUFFER_PASSWORD: 'inline-buffer',
      SOURCE_SHOP_EU_PASSWORD: 'inline-shop',
    });
    expect(effect(again)).toEqual(effect(config));
  });

  it('a configuration from the environment: the buffer stays in PHILOTES_BUFFER_*, the source becomes a file entry', () => {
    const bufferEnv = { PHILOTES_BUFFER_URL: 'postgres://philotes:buffer-secret@b:5432/buffer' };
    const env = {
      ...bufferEnv,
      PHILOTES_CDC_SOURCE_URL: 'postgres://cdc@s:5433/app',
      PHILOTES_CDC_SOURCE_PASSWORD: 'source-secret',
      PHILOTES_CDC_REPLICATION_SLOT: 'philotes_app',
      PHILOTES_CDC_SNAPSHOT: 'never',
      PHILOTES_CDC_KEYLESS_TABLES: 'accept',
      PHILOTES_CDC_BATCH_MAX_ROWS: '123',
      PHILOTES_READINESS_GRACE: '90s',
    };
    const config = loadConfig(env);
    const printed = printableConfig(config);
    expect(printed.document['buffer']).toBeUndefined();
    // A file refuses PHILOTES_CDC_* beside it: the run has the buffer's variables and the new one.
    const { again } = roundTrip(config, {
      ...bufferEnv,
      PHILOTES_READINESS_GRACE: '90s',
      SOURCE_PHILOTES_APP_PASSWORD: 'source-secret',
    });
    expect(effect(again)).toEqual(effect(config));
    expect(printed.notes).toContain(
      'set SOURCE_PHILOTES_APP_PASSWORD to the password of source philotes_app (it was given in PHILOTES_CDC_SOURCE_PASSWORD; print-config never prints a secret)',
    );
  });
});
